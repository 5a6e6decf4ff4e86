"""grokjax: grokking and anti-grokking of an MNIST MLP in JAX, with HTSR analysis.

Importing the package turns on JAX's 64-bit mode before any array exists: the paper
trains in float64 and every module here assumes it. If JAX was already imported and
used, the flag is still set, but arrays created earlier keep their dtype.
"""

import os as _os
import sys as _sys

_os.environ.setdefault("JAX_ENABLE_X64", "1")
if "jax" in _sys.modules:
    _sys.modules["jax"].config.update("jax_enable_x64", True)

__version__ = "0.1.0"
