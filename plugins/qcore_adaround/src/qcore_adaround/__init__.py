"""qcore-quant-adaround: AdaRound as a qcore plugin. Importing this package never imports torch."""
from __future__ import annotations

from qcore_adaround.config import AdaRoundConfig

__all__ = ["AdaRoundConfig"]
__version__ = "0.1.0"
