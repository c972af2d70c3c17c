"""qcore-quant-awq: activation-aware weight quantization (Lin et al., 2023) as a qcore plugin.

Importing this package does not import torch; the search runs in :mod:`qcore_awq.quantizer`.
"""
from __future__ import annotations

from qcore_awq.config import AWQConfig

__all__ = ["AWQConfig"]
__version__ = "0.1.0"
