"""qcore-quant-gptq: GPTQ as a qcore plugin. Importing this package never imports torch."""
from __future__ import annotations

from qcore_gptq.config import GPTQConfig

__all__ = ["GPTQConfig"]
__version__ = "0.1.0"
