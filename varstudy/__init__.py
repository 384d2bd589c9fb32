"""varstudy: study memory-efficient backpropagation.

Two families live here:

* randomized backprop through linear layers (``varstudy.layers``, ``varstudy.sketches``) and the
  gradient-variance measurement engine (``python -m varstudy.measure``);
* exact backprop through long sequences in bounded memory (``varstudy.sequence``).
"""

from varstudy.errors import VarstudyError

__version__ = "0.1.0"

__all__ = ["VarstudyError", "__version__"]
