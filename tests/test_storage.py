"""Storage tiers: round trips, async bounds, cleanup and faults (errors raised in the caller)."""

import errno
import os
import time

import pytest
import torch

from varstudy.errors import VarstudyError
from varstudy.checkpointing import (DiskTier, FastTier, HostTier, MemoryMeter, checkpointed_scan,
                                    make_tier)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, generator=g), torch.arange(5))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_round_trip_with_prefetch(tier, tmp_path):
    states = [_state(k) for k in range(4)]
    t = make_tier(tier, n_keys=4, template=states[0], disk_dir=str(tmp_path), timeout_s=5)
    with t:
        for k, s in enumerate(states):
            t.put(k, s)
        t.prefetch(3)
        for k in (3, 2, 1, 0):
            got = t.get(k)
            assert all(torch.equal(a, b) for a, b in zip(got, states[k]))
    assert os.listdir(tmp_path) == []  # the disk tier's private directory is gone


def test_fast_tier_meter_counts_bytes():
    meter = MemoryMeter()
    fast = FastTier(meter)
    fast.put("a", (torch.zeros(10),))
    fast.put("b", (torch.zeros(5, dtype=torch.float64),))
    assert meter.bytes_now == 80 and meter.peak_bytes == 80
    fast.get("a", free=True)
    assert meter.bytes_now == 40
    with pytest.raises(VarstudyError, match="fast tier has no state"):
        fast.get("a")


def test_unknown_tier_lists_choices():
    with pytest.raises(VarstudyError, match="valid choices: host, disk"):
        make_tier("tape", n_keys=1, template=_state(0))


def _enospc(obj, path):
    open(path, "wb").close()  # a partial file, which must be removed
    raise OSError(errno.ENOSPC, "No space left on device", path)


def test_full_disk_raises_in_caller_and_cleans_up(tmp_path):
    t = DiskTier(str(tmp_path), write_fn=_enospc, timeout_s=5)
    t.put(0, _state(0))
    t0 = time.perf_counter()
    with pytest.raises(VarstudyError, match="disk tier: .*No space left"):
        t.get(0)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(VarstudyError, match="writing state 0 failed"):
        t.close()
    assert os.listdir(tmp_path) == []


def test_read_only_directory_raises(tmp_path):
    """Tests run as root, so chmod alone may not block writes; the EACCES is injected as well."""
    def read_only(obj, path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    t = DiskTier(str(tmp_path), write_fn=read_only, timeout_s=5)
    os.chmod(t.dir, 0o500)
    try:
        t.put(0, _state(0))
        with pytest.raises(VarstudyError, match="Permission denied"):
            t.wait_writes()
    finally:
        os.chmod(t.dir, 0o700)
        with pytest.raises(VarstudyError):
            t.close()
    assert os.listdir(tmp_path) == []


def test_slow_write_times_out_instead_of_hanging(tmp_path):
    def slow(obj, path):
        time.sleep(0.6)
        torch.save(obj, path)

    t = DiskTier(str(tmp_path), write_fn=slow, timeout_s=0.1, max_pending=1)
    t.put(0, _state(0))
    t0 = time.perf_counter()
    with pytest.raises(VarstudyError, match="timed out"):
        t.put(1, _state(1))  # bounded queue: the second write waits for a slot, then gives up
    assert time.perf_counter() - t0 < 0.5
    t.close()
    assert os.listdir(tmp_path) == []


def test_host_pool_is_preallocated_and_throttle_is_applied():
    t = HostTier(2, _state(0), transfer_delay_s=0.02, timeout_s=5)
    assert len(t.pool) == 2
    t.put(0, _state(1))
    t.wait_writes()
    assert t.write_times_s[0] >= 0.02
    assert torch.equal(t.get(0)[0], _state(1)[0])
    t.close()


def test_scan_surfaces_disk_fault_and_leaves_no_files(tmp_path):
    w = torch.randn(3, 3, requires_grad=True)
    step = lambda h, x: (torch.tanh(h @ w + x), h.sum())  # noqa: E731
    with pytest.raises(VarstudyError, match="No space left"):
        ys, h = checkpointed_scan(step, torch.zeros(2, 3), torch.randn(12, 2, 3), strategy="multistage",
                                  slots=2, interval=3, tier="disk", disk_dir=str(tmp_path),
                                  write_fn=_enospc, timeout_s=5)
        (ys.sum() + h.sum()).backward()
    assert os.listdir(tmp_path) == []
