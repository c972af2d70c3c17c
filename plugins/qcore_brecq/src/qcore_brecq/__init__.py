"""qcore-quant-brecq: BRECQ block reconstruction as a qcore plugin. Importing this package never imports torch."""
from __future__ import annotations

from qcore_brecq.config import BrecqConfig

__all__ = ["BrecqConfig"]
__version__ = "0.1.0"
