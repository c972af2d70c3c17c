"""qcore-quant-quarot: QuaRot (Ashkboos et al., 2024) as a qcore plugin.

Rotations are named as in SpinQuant: R1 on the residual stream (fused into every weight that
reads or writes it), R2 per attention head on v -> o (fused), R4 an online Hadamard on the input
of every down projection. Importing this package does not import torch.
"""
from __future__ import annotations

from qcore_quarot.config import QuaRotConfig

__all__ = ["QuaRotConfig"]
__version__ = "0.1.0"
