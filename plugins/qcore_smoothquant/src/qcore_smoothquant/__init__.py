"""qcore-quant-smoothquant: SmoothQuant (Xiao et al., 2022) as a qcore plugin.

Importing this package does not import torch; the algorithm runs in :mod:`qcore_smoothquant.quantizer`.
"""
from __future__ import annotations

from qcore_smoothquant.config import SmoothQuantConfig

__all__ = ["SmoothQuantConfig"]
__version__ = "0.1.0"
