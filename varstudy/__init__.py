"""varstudy: study memory-efficient backpropagation.

Two families live here:

* randomized backprop through linear layers (``varstudy.randomized.layers``, ``varstudy.randomized.sketches``) and the
  gradient-variance measurement engine (``python -m varstudy.measure``);
* exact backprop through long sequences in bounded memory (``varstudy.checkpointing.sequence``).
"""

from varstudy.errors import VarstudyError
from varstudy.randomized.layers import RandomizedLinear, derandomize, randomize, reseed
from varstudy.randomized.sketches import SKETCHES, get_sketch

__version__ = "0.1.0"

__all__ = ["SKETCHES", "RandomizedLinear", "VarstudyError", "__version__", "derandomize",
           "get_sketch", "randomize", "reseed"]
