"""peak_saved_bytes: live saved-for-backward bytes over a whole step, on models whose peak is
known by construction (hand computations in each test), plus the CUDA path through a fake."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from varstudy.checkpointing import MemoryMeter, checkpointed_sequential
from varstudy.checkpointing.encoder import checkpoint_encoder
from varstudy.models import load_model
from varstudy.randomized.layers import randomize
from varstudy.randomized.memory import saved_bytes
from varstudy.randomized.peak import CudaMemoryOps, _memory_ops, peak_saved_bytes

B, D, W, N = 4, 8, 32, 6  # batch, block width, inner width, blocks
F32 = 4


def chain():
    """N blocks (B, D) -> Linear(D, W) -> tanh -> Linear(W, D) -> tanh -> (B, D).

    Plain autograd saves per block its input (B, D) (for the first Linear's weight gradient; it
    is the previous block's second tanh output, one storage) and the two tanh outputs (B, W) and
    (B, D), which the next Linear saves again. Weights are parameters, not counted; ``sum``
    saves nothing.
    """
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, W), nn.Tanh(), nn.Linear(W, D), nn.Tanh())
                           for _ in range(N))
    x = torch.randn(B, D, requires_grad=True)
    return blocks, x


def run_plain(blocks, x):
    for block in blocks:
        x = block(x)
    return x.sum()


def nondecreasing(values):
    return all(a <= b for a, b in zip(values, values[1:]))


def test_plain_chain_peaks_at_the_end_of_forward():
    blocks, x = chain()
    report = peak_saved_bytes(run_plain, blocks, x, model=blocks)
    total = F32 * B * (D + N * (W + D))  # x, then per block tanh outputs (W) and (D)
    assert report.peak_bytes == report.forward_bytes == total
    assert report.peak_phase == "forward" and report.end_bytes == 0
    assert saved_bytes(run_plain, blocks, x, model=blocks)[1].total == total
    fwd = [s for p, s, _ in report.timeline if p == "forward"]
    bwd = [s for p, s, _ in report.timeline if p == "backward"]
    assert nondecreasing(fwd) and nondecreasing(bwd[::-1]) and bwd[-1] == 0


def test_retain_graph_keeps_the_saved_tensors():
    blocks, x = chain()
    report = peak_saved_bytes(run_plain, blocks, x, model=blocks,
                              backward=lambda out: out.backward(retain_graph=True))
    assert report.end_bytes == report.forward_bytes == F32 * B * (D + N * (W + D))
    assert not [s for p, s, _ in report.timeline if p == "backward"]  # nothing released


def test_reentrant_checkpoint_peaks_in_backward():
    """Forward keeps the N block inputs (B, D). Backward of the last block recomputes it under
    our hooks: its Linear saves the detached input (the same storage) and the tanh outputs
    (B, W) and (B, D) are new, while all N inputs are still saved: N·D + W + D."""
    blocks, x = chain()

    def run():
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=True)
        return h.sum()

    report = peak_saved_bytes(run, model=blocks)
    assert report.forward_bytes == F32 * B * N * D
    assert report.peak_bytes == F32 * B * (N * D + W + D)
    assert report.peak_phase == "backward" and report.end_bytes == 0


def test_non_reentrant_checkpoint_internals_are_not_seen():
    """Pins NOTE [release]: use_reentrant=False recomputes under hooks of its own, so only its
    saved block inputs are counted and the peak stays the forward's N·D."""
    blocks, x = chain()

    def run():
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False)
        return h.sum()

    report = peak_saved_bytes(run, model=blocks)
    assert report.peak_bytes == report.forward_bytes == F32 * B * N * D
    assert report.peak_phase == "forward"


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_revolve_peak_is_slots_plus_one_step(slots):
    """checkpointed_sequential saves nothing in its (untaped) forward and holds s slots plus the
    live last state, (s + 1)·D (preserve_rng=False: no RNG states in the checkpoints). Backward
    frees the live state, then re-tapes the last step with the s slots held: the re-tape saves
    its input (D), and tanh outputs (W) and (D), freed again by its autograd.grad. So the peak is
    exactly s·D + (2·D + W), in backward, below plain autograd's D + N·(W + D)."""
    blocks, x = chain()
    meter = MemoryMeter()

    def run():
        out = checkpointed_sequential(blocks, x, strategy="revolve", slots=slots, meter=meter,
                                      preserve_rng=False)
        return out.sum()

    report = peak_saved_bytes(run, model=blocks, meter=meter)
    step_internals = F32 * B * (2 * D + W)
    assert report.forward_bytes == 0
    assert report.forward_held_bytes == F32 * B * D * (slots + 1)
    assert report.peak_bytes == F32 * B * D * slots + step_internals
    assert report.peak_phase == "backward"
    assert report.phase_peak("backward", "saved") == step_internals
    assert report.peak_bytes < F32 * B * (D + N * (W + D))
    assert report.end_bytes == 0 and report.timeline[-1][1:] == (0, 0)
    grads = torch.autograd.grad(run_plain(blocks, x), [x])
    assert torch.equal(torch.autograd.grad(run(), [x])[0], grads[0])


def lm_step(model):
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(1))
    return lambda: model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss


@pytest.mark.parametrize("family", [None, "rows"])
def test_forward_bytes_equal_saved_bytes(family):
    model, _ = load_model("tiny-bert")
    if family is not None:
        randomize(model, ratio=0.5, sketch=family)
    expected = saved_bytes(lm_step(model), model=model)[1].total  # sketch bytes: seed-free
    report = peak_saved_bytes(lm_step(model), model=model)
    assert report.forward_bytes == report.peak_bytes == expected
    assert report.end_bytes == 0


def test_encoder_revolve_moves_the_peak_into_backward():
    model, _ = load_model("tiny-bert", dropout=True)
    plain = peak_saved_bytes(lm_step(model), model=model)
    meter = MemoryMeter()

    def run():
        with checkpoint_encoder(model, strategy="revolve", slots=1, meter=meter):
            return lm_step(model)()  # backward runs after the block: the scan keeps its plan

    report = peak_saved_bytes(run, model=model, meter=meter)
    assert report.peak_phase == "backward"
    assert report.forward_bytes < plain.forward_bytes and report.peak_bytes < plain.peak_bytes
    assert report.end_bytes == 0


def test_meter_bytes_present_before_the_step_count_as_held():
    meter = MemoryMeter()
    meter.add(100)
    blocks, x = chain()
    report = peak_saved_bytes(run_plain, blocks, x, model=blocks, meter=meter)
    assert report.forward_held_bytes == 100
    assert report.peak_bytes == 100 + F32 * B * (D + N * (W + D))
    meter.add(5)  # unsubscribed after the step
    assert report.timeline[-1][2] == 100


def test_meter_subscribe_and_unsubscribe():
    meter, seen = MemoryMeter(), []
    stop = meter.subscribe(seen.append)
    meter.add(10)
    meter.sub(4)
    stop()
    meter.add(1)
    assert seen == [10, -4] and meter.bytes_now == 7 and meter.peak_bytes == 10


class FakeCuda:
    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def max_allocated(self):
        self.calls.append("max")
        return 1234


def test_cuda_peak_path_through_fake_ops():
    blocks, x = chain()
    fake = FakeCuda()

    def run():
        fake.calls.append("forward")
        return run_plain(blocks, x)

    report = peak_saved_bytes(run, model=blocks, memory_ops=fake,
                              backward=lambda out: (fake.calls.append("backward"),
                                                    out.backward()))
    assert fake.calls == ["reset", "forward", "backward", "max"]
    assert report.cuda_max_allocated == 1234
    assert peak_saved_bytes(run_plain, blocks, x, model=blocks).cuda_max_allocated is None


def test_memory_ops_chosen_by_device():
    assert isinstance(_memory_ops("cuda:0", None, None), CudaMemoryOps)  # no CUDA call yet
    assert _memory_ops("cpu", None, None) is None
    assert _memory_ops(None, nn.Linear(2, 2), None) is None
