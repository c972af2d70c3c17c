"""Low-bit weights: primitives (affine, NF4), int32 packing, ``QuantLinear`` and its kernels.

Importing this package imports torch; ``import qcore`` does not import it.
"""
from __future__ import annotations

from qcore.quant.act import ActQuant, calibrate_static_scale, fake_quant_act, quantize_act_int8
from qcore.quant.linear import BACKEND_ENV, BACKEND_RTOL, QuantLinear, backend_names
from qcore.quant.packing import pack_codes, packed_words, unpack_codes
from qcore.quant.primitives import (
    NF4_TABLE,
    QuantizedWeight,
    dequantize_codes,
    dequantize_nf4,
    quant_params,
    quantize_codes,
    quantize_nf4,
    quantize_rtn,
)

__all__ = [
    "BACKEND_ENV", "BACKEND_RTOL", "NF4_TABLE", "ActQuant", "QuantLinear",
    "QuantizedWeight", "backend_names", "calibrate_static_scale", "dequantize_codes", "dequantize_nf4",
    "fake_quant_act", "pack_codes", "packed_words", "quant_params", "quantize_act_int8",
    "quantize_codes", "quantize_nf4", "quantize_rtn", "unpack_codes",
]
