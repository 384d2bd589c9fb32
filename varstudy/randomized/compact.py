"""An exact linear layer that keeps only its own input for backward.

NOTE [compact exact]: ``nn.Linear`` saves its input for the weight gradient. When that input is a
view into a larger tensor (BERT's pooler reads ``hidden[:, 0]``: B of the B·L rows), the saved
view keeps the whole storage alive, B·L·d numbers instead of the B·d that a plan charges an exact
layer (measured on MiniLM at B 16, L 64: 393,216 numbers instead of 6,144, which put a plan at
the bytes of uniform ρ = 0.05 at 0.071 of the linear layers' exact bytes instead of 0.050).
``randomize(model, plan=...)`` turns the layers a plan keeps exact into ``CompactLinear``: when
the input's storage is larger than the input, the layer computes on a compact copy, so autograd
saves B·d numbers and the view's storage is freed with its last other user. The copy holds the
same values, so outputs and gradients equal ``nn.Linear``'s bit for bit; the test is a property
of the tensor (no host sync). ``derandomize`` turns it back into ``nn.Linear``.

``EXACT_ROWS`` is the same rule for a RandomizedLinear that an online plan makes exact
(``RandomizedLinear.set_exact``): the "sketch" S = I whose stored SᵀX is the compact input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varstudy.randomized.sketches import Sketch


def compact(x: Tensor) -> Tensor:
    """``x``, or a contiguous copy when ``x`` is a view of a larger storage (NOTE [compact
    exact])."""
    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return x.clone(memory_format=torch.contiguous_format)
    return x


class CompactLinear(nn.Linear):
    """``nn.Linear`` whose saved input is never a view of a larger storage (NOTE [compact
    exact])."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "CompactLinear":
        """A CompactLinear sharing ``linear``'s parameter objects (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.training = linear.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(compact(x), self.weight, self.bias)


class ExactRows(Sketch):
    """S = I with k = n: the layer stores its (compact) input and Ĝ = G, with no sketch
    variance. Not a family to choose: how a RandomizedLinear made exact runs."""

    name = "exact"

    def sketch(self, x, k, seed):
        return compact(x), ()

    def apply(self, a, k, seed, state):
        return a

    def form(self, s, a, p, n, k):
        return 0.0 * a


EXACT_ROWS = ExactRows()

