"""Seeds of sketches: one integer per (base seed, layer, call, ...), so every draw is reproducible
and distinct from every other (NOTE [fresh sketches, one seed] in varstudy.randomized.layers)."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def derive_seed(base_seed: int, *keys: int) -> int:
    """Mix ``base_seed`` and integer keys into a 63-bit seed (splitmix64 finalizer per step).

    The base seed is mixed on its own before the first key is added, so no two (base, keys)
    tuples are related by shifting one into the other (adding the first key straight to the base
    made derive_seed(s, l, c) equal derive_seed(s + 1, l − 1, c)).
    """
    z = _mix(int(base_seed) & _MASK64)
    for key in keys:
        z = _mix((z + (int(key) & _MASK64)) & _MASK64)
    return z >> 1


def _mix(z: int) -> int:
    """splitmix64: add the golden-ratio increment, then the finalizer (a bijection on 64 bits)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
