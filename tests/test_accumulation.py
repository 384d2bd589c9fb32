"""Gradient accumulation (varstudy.accumulation): the accumulated gradient is the minibatch's,
NOTE [accumulation weights], on tiny-bert with dropout off, fixed and dynamic padding."""

import pytest
import torch

from varstudy.accumulation import accumulate, loss_terms, split
from varstudy.batching import encode, trim_padding
from varstudy.checkpointing.encoder import checkpoint_encoder
from varstudy.data import load_dataset
from varstudy.errors import VarstudyError
from varstudy.models import load_model


@pytest.fixture(scope="module")
def tiny():
    """tiny-bert without dropout, and 10 synthetic examples of varied length padded to 24."""
    model, tok = load_model("tiny-bert", dropout=False, seed=0)
    data = load_dataset("synthetic", "train")
    enc = encode(data.subset(list(range(10))), tok, 24)
    lengths = enc["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() < 24  # padding of varied width: dynamic padding trims
    return model, enc


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _full(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), _grads(model)


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 10])
@pytest.mark.parametrize("padding", ["fixed", "dynamic"])
def test_accumulated_gradient_is_the_minibatch_gradient(tiny, m, padding):
    """10 examples in m micro-batches (3: sizes 4, 3, 3, so unequal weights): the same
    gradient and loss as the whole minibatch; dynamic padding trims each micro-batch to its
    own longest sequence."""
    model, enc = tiny
    batch = trim_padding(enc) if padding == "dynamic" else enc
    loss, want = _full(model, batch)
    got_loss = accumulate(model, batch, m, trim=padding == "dynamic")
    _close(_grads(model), want)
    assert float(got_loss) == pytest.approx(loss, rel=1e-5)


def test_plain_sum_of_micro_batch_losses_is_not_the_gradient(tiny):
    """The weights matter: summing the micro-batch means (no w_j) gives m times the gradient,
    and an unweighted mean over unequal micro-batches is off as well."""
    model, enc = tiny
    _, want = _full(model, enc)
    for micro, _ in split(enc, 3):
        model(**micro).loss.backward()
    got = _grads(model)
    key = "classifier.weight"
    assert not torch.allclose(got[key], want[key], rtol=1e-3)
    assert not torch.allclose(got[key] / 3, want[key], rtol=1e-3)  # sizes 4, 3, 3


def test_weights_and_trimming(tiny):
    _, enc = tiny
    parts = split(enc, 3, trim=True)
    assert [p[0]["input_ids"].shape[0] for p in parts] == [4, 3, 3]
    assert [w for _, w in parts] == pytest.approx([0.4, 0.3, 0.3])
    for micro, _ in parts:
        width = micro["input_ids"].shape[1]
        assert width == int(micro["attention_mask"].sum(1).max()) <= 24
    (whole, weight), = split(enc, 1)
    assert weight == 1.0 and all(torch.equal(whole[k], v) for k, v in enc.items())
    for bad in (0, 11, 2.0, True):
        with pytest.raises(VarstudyError, match="micro-batches"):
            split(enc, bad)


def test_token_level_loss_weights_by_labelled_tokens():
    """A token-level mean loss averages over labelled tokens, not examples: the weights are
    each micro-batch's share of them, micro-batches without any are skipped, and the weighted
    sum of the micro-batch means is the minibatch's mean."""
    torch.manual_seed(0)
    labels = torch.full((4, 5), -100)
    labels[0, :5] = 1
    labels[1, :1] = 0
    labels[3, :2] = 1  # example 2 has no labelled token
    batch = {"labels": labels, "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    assert loss_terms(batch).tolist() == [5, 1, 0, 2]
    parts = split(batch, 4)
    assert [w for _, w in parts] == pytest.approx([5 / 8, 1 / 8, 2 / 8])
    logits = torch.randn(4, 5, 3)
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))
    total = 0.0
    for (micro, w), rows in zip(parts, ([0], [1], [3])):
        part = torch.nn.functional.cross_entropy(logits[rows].reshape(-1, 3),
                                                 micro["labels"].reshape(-1))
        total += w * float(part)
    assert total == pytest.approx(float(full), rel=1e-6)
    floats = {"labels": torch.rand(4, 3)}  # multi-label / regression: per example
    assert loss_terms(floats).tolist() == [1, 1, 1, 1]
    with pytest.raises(VarstudyError, match="no loss terms"):
        split({"labels": torch.full((2, 3), -100)}, 2)


def test_accumulation_with_torch_checkpoint_is_the_minibatch_gradient(tiny):
    """Combined with per-layer torch checkpointing (the frontier's combination)."""
    model, enc = tiny
    _, want = _full(model, enc)
    accumulate(model, enc, 4, context=lambda: checkpoint_encoder(model, strategy="torch"))
    _close(_grads(model), want)
