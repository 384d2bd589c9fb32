"""Model loading, dropout control, error messages and linear-layer naming."""

from collections import Counter

import pytest
import torch
from torch import nn

import varstudy.models as models
from varstudy.errors import VarstudyError
from varstudy.models import list_models, load_model
from varstudy.roles import LAYER_KINDS, layer_index, layer_kind, linear_names


def _batch(tokenizer, pair=False):
    a = ["a good movie", "bad, boring and long"]
    enc = tokenizer(a, ["so it goes", "indeed"] if pair else None, padding="max_length",
                    max_length=16, truncation=True, return_tensors="pt")
    return dict(enc, labels=torch.tensor([1, 0]))


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def _dropout_ps(model):
    return {m.p for m in model.modules() if isinstance(m, nn.Dropout)}


HEADS = {  # the classification-head weights of each named model
    "minilm": ("bert.pooler.dense.weight", "classifier.weight"),
    "tiny-bert": ("bert.pooler.dense.weight", "classifier.weight"),
    "tiny-roberta": ("classifier.dense.weight", "classifier.out_proj.weight"),
}


@pytest.mark.parametrize("name", ["minilm", "tiny-bert", "tiny-roberta"])
def test_named_models_load_and_run(name, minilm):
    """Every trainable parameter gets a finite gradient, non-zero except the attention key biases.

    A key bias adds q·b_k to every score of a query row, which the softmax ignores, so its exact
    gradient is 0 (autograd leaves float32 rounding, ~1e-10 of the largest gradient norm); every
    other parameter's gradient norm exceeds 1e-6 of the largest (the smallest, in the tiny
    random models, are ~5e-4 of it). Gradients via autograd.grad: the shared fixture keeps no .grad.
    """
    model, tok = minilm if name == "minilm" else load_model(name)
    out = model(**_batch(tok))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    params = dict(model.named_parameters())
    assert set(HEADS[name]) <= set(params)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable == list(params)
    grads = torch.autograd.grad(out.loss, [params[n] for n in trainable])  # None would raise
    norms = {n: float(g.norm()) for n, g in zip(trainable, grads)}
    assert all(torch.isfinite(g).all() for g in grads)
    largest = max(norms.values())
    zero = {n for n, v in norms.items() if v <= 1e-6 * largest}
    layers = model.config.num_hidden_layers
    prefix = model.base_model_prefix  # "bert" or "roberta"
    assert zero == {f"{prefix}.encoder.layer.{i}.attention.self.key.bias" for i in range(layers)}
    assert all(norms[n] > 1e-6 * largest for n in HEADS[name])
    assert model.training and model.config._attn_implementation == "eager"
    assert list_models() == ["minilm", "mpnet-base", "tiny-bert", "tiny-roberta"]


def test_minilm_shape_and_seeded_head():
    model, _ = load_model("minilm", num_labels=3, seed=1)
    again, _ = load_model("minilm", num_labels=3, seed=1)
    other, _ = load_model("minilm", num_labels=3, seed=2)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.weight.shape == (3, 384)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    # the pretrained encoder does not depend on the seed
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[q], other.state_dict()[q])


def test_seed_restores_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-bert", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_flag(minilm):
    model, _ = minilm
    assert _dropout_ps(model) == {0.0}
    cfg = model.config
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.0
    assert cfg.classifier_dropout == 0.0
    kept, _ = load_model("tiny-bert", dropout=True)
    assert _dropout_ps(kept) == {0.1} and kept.config.hidden_dropout_prob == 0.1


def test_zero_dropout_is_deterministic_in_train_mode():
    model, tok = load_model("tiny-bert")
    batch = _batch(tok)
    assert torch.equal(model(**batch).logits, model(**batch).logits)


def test_tiny_roberta_with_minilm_tokenizer_pairs():
    model, tok = load_model("tiny-roberta")
    batch = _batch(tok, pair=True)
    assert batch["token_type_ids"].max() == 1 and batch["input_ids"].max() < 30522
    assert model(**batch).logits.shape == (2, 2)
    assert model.config.pad_token_id == tok.pad_token_id


def test_regression_head_and_dtype():
    model, tok = load_model("tiny-bert", num_labels=1, dtype=torch.float64)
    batch = dict(_batch(tok), labels=torch.tensor([0.5, 2.0], dtype=torch.float64))
    out = model(**batch)
    assert out.logits.shape == (2, 1) and out.logits.dtype == torch.float64


def test_local_directory_roundtrip(tmp_path):
    model, tok = load_model("tiny-bert", seed=3)
    model.save_pretrained(tmp_path)  # no tokenizer files: falls back to MiniLM's vocabulary
    loaded, tok2 = load_model(str(tmp_path))
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    assert tok2.vocab_size == tok.vocab_size


@pytest.mark.parametrize("bad", ["not-a-model", "./missing_dir", "/no/such/dir", "a/b/c"])
def test_bad_names_list_valid_choices(bad):
    with pytest.raises(VarstudyError, match="minilm, mpnet-base, tiny-bert, tiny-roberta"):
        load_model(bad)


def test_directory_without_config(tmp_path):
    with pytest.raises(VarstudyError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_failure_is_one_clear_error(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "_from_pretrained", fail)
    with pytest.raises(VarstudyError, match="could not be downloaded.*connection refused"):
        load_model("some-org/some-model")


def test_bad_options():
    with pytest.raises(VarstudyError, match="valid choices: eager, sdpa"):
        load_model("tiny-bert", attn_implementation="flash")
    with pytest.raises(VarstudyError, match="num_labels"):
        load_model("tiny-bert", num_labels=0)


def test_qkv_read_the_same_tensor_object(minilm):
    """NOTE [shared input]: one stored sketch can serve query, key and value."""
    model, tok = minilm
    seen = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[0]))
        for name, module in model.named_modules()
        if name.startswith("bert.encoder.layer.2.attention.self.")
        and isinstance(module, nn.Linear)
    ]
    with torch.no_grad():
        model(**_batch(tok))
    for h in hooks:
        h.remove()
    assert len(seen) == 3 and len({id(t) for t in seen.values()}) == 1


def test_layer_kind_on_all_minilm_linears(minilm):
    names = linear_names(minilm[0])
    assert len(names) == 38
    kinds = Counter(layer_kind(n) for n in names)
    per_layer = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    assert kinds == Counter({**{k: 6 for k in per_layer}, "pooler": 1, "classifier": 1})
    assert set(kinds) <= set(LAYER_KINDS)
    indices = [layer_index(n) for n in names]
    assert indices[:36] == [i for i in range(6) for _ in range(6)]
    assert indices[36:] == [None, None]
    assert [layer_kind(n) for n in names[:6]] == list(per_layer)


@pytest.mark.parametrize("name, kind, index", [
    ("roberta.encoder.layer.1.output.dense", "ffn_out", 1),
    ("roberta.encoder.layer.0.attention.output.dense", "attn_out", 0),
    ("classifier.dense", "classifier", None),
    ("classifier.out_proj", "classifier", None),
    ("bert.embeddings.word_embeddings", "other", None),
    ("encoder.layer.11.intermediate.dense", "ffn_in", 11),
])
def test_layer_kind_names(name, kind, index):
    assert layer_kind(name) == kind and layer_index(name) == index


def test_directory_without_tokenizer_and_foreign_vocab(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(VarstudyError, match="no tokenizer files"):
        load_model(str(tmp_path))


def test_load_tokenizer_alone():
    from varstudy.models import load_tokenizer

    assert load_tokenizer().vocab_size == 30522
    with pytest.raises(VarstudyError, match="valid choices: minilm"):
        load_tokenizer("no-such-tokenizer")


def test_sdpa_matches_eager():
    eager, tok = load_model("tiny-bert", seed=5)
    fused, _ = load_model("tiny-bert", seed=5, attn_implementation="sdpa")
    batch = _batch(tok)
    assert fused.config._attn_implementation == "sdpa"
    torch.testing.assert_close(fused(**batch).logits, eager(**batch).logits)
