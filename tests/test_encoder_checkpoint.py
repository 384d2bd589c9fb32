"""checkpoint_encoder: BERT/RoBERTa/MPNet layer stacks under torch/revolve/multistage give plain
autograd's loss and gradients, with dropout on and with randomized layers.

Equality is exact (torch.equal), not a tolerance: a checkpointed step runs the same CPU kernels
on the same values (dropout masks replayed from saved RNG states, sketches from the same seeds)
and sums each gradient in the same order, so any difference is a replay error. The one
comparison with a tolerance is rows-wor at ratio 1 against the exact model: there S is a
permutation, so (SᵀY)ᵀ(SᵀX) sums the rows of YᵀX in another order (atol 1e-6, rtol 1e-6:
float32 rounding of sums of 27 rows).
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import (BertConfig, BertForSequenceClassification, MPNetConfig,
                          MPNetForSequenceClassification)

from varstudy.checkpointing import ScanStats
from varstudy.checkpointing.encoder import ENCODER_STRATEGIES, checkpoint_encoder, find_encoder
from varstudy.errors import VarstudyError
from varstudy.models import load_model
from varstudy.randomized.layers import RandomizedLinear, randomize

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")


def bert4():
    """4 layers, so Revolve with one slot recomputes; config dropout 0.1 (on)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**SMALL)).train()


def mpnet4():
    """MPNet's calling convention: layer(h, mask, position_bias) returns a tuple."""
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(**SMALL, pad_token_id=1)).train()


def tiny(name):
    return lambda: load_model(name, dropout=True, seed=0)[0]


BUILDERS = {"tiny-bert": tiny("tiny-bert"), "tiny-roberta": tiny("tiny-roberta"),
            "bert-4": bert4, "mpnet-4": mpnet4}
STRATEGIES = [("torch", {}), ("revolve", dict(slots=1)), ("revolve", dict(slots=2)),
              ("multistage", dict(slots=1, interval=2))]


def batch(model):
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(5, min(vocab, 2000), (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = model.config.pad_token_id
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))


def step(model, strategy="none", rng=5, **kw):
    """One forward/backward at RNG seed ``rng``; (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng)
    with checkpoint_encoder(model, strategy=strategy, **kw):
        loss = model(**batch(model)).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert set(ga) == set(gb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def counters(model):
    return [m.calls for m in model.modules() if isinstance(m, RandomizedLinear)]


@pytest.mark.parametrize("name", BUILDERS)
def test_dropout_is_on(name):
    """Two RNG seeds give two losses: the equality tests below do exercise the replay."""
    model = BUILDERS[name]()
    assert step(model, rng=5)[0] != step(model, rng=6)[0]


@pytest.mark.parametrize("strategy,kw", STRATEGIES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", BUILDERS)
def test_gradients_equal_plain(name, strategy, kw):
    model = BUILDERS[name]()
    plain = step(model)
    stats = ScanStats()
    kw = kw if strategy == "torch" else dict(kw, stats=stats)
    assert_same(step(model, strategy, **kw), plain)
    if strategy != "torch":
        n = len(find_encoder(model).layers)
        assert stats.forward_steps == n and stats.retaped_steps == n
        if n == 4 and kw["slots"] == 1:
            assert stats.recompute_steps > 0  # Revolve advanced from its slot again


def test_mpnet_position_bias_gets_its_gradient():
    """The bias is a non-leaf tensor made outside the layers (NOTE [layer stack])."""
    model = mpnet4()
    plain = step(model)
    got = step(model, "revolve", slots=1)
    key = "mpnet.encoder.relative_attention_bias.weight"
    assert key in got[1] and got[1][key].abs().sum() > 0
    assert torch.equal(got[1][key], plain[1][key])


@pytest.mark.parametrize("strategy,kw", STRATEGIES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["tiny-bert", "mpnet-4"])
def test_randomized_permutation_equals_exact_model(name, strategy, kw):
    """rows-wor at ratio 1 is a permutation: the checkpointed randomized model's gradients are
    the exact model's up to summation order."""
    exact = step(BUILDERS[name]())
    model = BUILDERS[name]()
    randomize(model, ratio=1.0, sketch="rows-wor", seed=2)
    loss, grads = step(model, strategy, **kw)
    assert torch.equal(loss, exact[0])
    assert set(grads) == set(exact[1])
    for n in grads:
        torch.testing.assert_close(grads[n], exact[1][n], rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("strategy,kw", STRATEGIES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["bert-4", "mpnet-4"])
def test_randomized_sketches_replayed(name, strategy, kw):
    """rows at ratio 0.5: a recomputation drawing another sketch would change the gradient.
    Two steps in a row, so the call counters must also advance as in a plain step."""
    plain, ckpt = BUILDERS[name](), BUILDERS[name]()
    for model in (plain, ckpt):
        randomize(model, ratio=0.5, sketch="rows", seed=3)
    for rep in range(2):
        assert_same(step(ckpt, strategy, rng=5 + rep, **kw), step(plain, rng=5 + rep))
        assert counters(ckpt) == counters(plain) == [rep + 1] * len(counters(plain))


def test_torch_checkpoint_alone_redraws_the_sketch():
    """What the per-layer counter handling fixes (NOTE [sketch seeds]): torch's recomputation of
    a RandomizedLinear draws at the next call, so the weight gradient differs from plain autograd
    and the counter advances twice."""
    lin = RandomizedLinear(6, 5, ratio=0.5, sketch="rows", seed=1)
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(0))
    grads = []
    for use_checkpoint in (False, True):
        lin.calls, lin.weight.grad = 0, None
        out = checkpoint(lin, x, use_reentrant=False) if use_checkpoint else lin(x)
        out.pow(2).sum().backward()
        grads.append(lin.weight.grad.clone())
    assert lin.calls == 2
    assert not torch.equal(grads[0], grads[1])


def test_forward_restored_after_block_and_after_error():
    model = bert4()
    stack = find_encoder(model)
    names = [n for n, _ in model.named_parameters()]
    with checkpoint_encoder(model, strategy="revolve") as inside:
        assert inside.encoder is stack.encoder and "forward" in vars(stack.encoder)
        assert [n for n, _ in model.named_parameters()] == names
    assert "forward" not in vars(stack.encoder) and "layer" not in vars(stack.encoder)
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint_encoder(model, strategy="torch"):
            raise RuntimeError("boom")
    assert "forward" not in vars(stack.encoder)
    assert isinstance(stack.encoder.layer, torch.nn.ModuleList)


def test_no_grad_and_eval_forward_match_plain():
    model = bert4().eval()
    b = batch(model)
    with torch.no_grad():
        ref = model(**b).logits
        for strategy in ENCODER_STRATEGIES:
            with checkpoint_encoder(model, strategy=strategy):
                assert torch.equal(model(**b).logits, ref)


def test_bad_input_is_one_line():
    model = bert4()
    with pytest.raises(VarstudyError, match=r"unknown encoder checkpointing strategy 'x'; "
                                            r"valid choices: none, torch, revolve, multistage"):
        with checkpoint_encoder(model, strategy="x"):
            pass
    with pytest.raises(VarstudyError, match="no recognized encoder stack; valid choices"):
        with checkpoint_encoder(torch.nn.Linear(3, 3)):
            pass
    with pytest.raises(VarstudyError, match="already checkpointed"):
        with checkpoint_encoder(model), checkpoint_encoder(model):
            pass
    with pytest.raises(VarstudyError, match="output_hidden_states=True is not available"):
        with checkpoint_encoder(model):
            model(**batch(model), output_hidden_states=True)
    model.activation_checkpointing_enable()
    with pytest.raises(VarstudyError, match="gradient checkpointing is enabled"):
        with checkpoint_encoder(model):
            pass


def test_shared_randomized_layer_refused_under_revolve():
    """Layer 0 applied twice: torch's first calls are taped, so it still replays exactly."""
    plain, model = bert4(), bert4()
    for m in (plain, model):
        randomize(m, ratio=0.5, sketch="rows")
        layers = find_encoder(m).layers
        layers[1] = layers[0]
    with pytest.raises(VarstudyError, match="shares a RandomizedLinear.*valid choices"):
        step(model, "revolve")
    model.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, RandomizedLinear):
            m.calls = 0
    assert_same(step(model, "torch"), step(plain))
