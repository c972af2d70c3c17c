"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel / optimum, read by transformers, vLLM, TGI):
imported by ``qcore.load``, written by ``qcore.export(..., format="gptq")``.

Per quantized linear ``NAME`` (``out`` x ``in``, ``bits`` in 2/4/8, ``G`` groups)::

    NAME.qweight  int32 [in * bits / 32, out]   codes packed along the input, first in the lowest bits
    NAME.qzeros   int32 [G, out * bits / 32]    zero points packed along the output
    NAME.scales   float16 [G, out]
    NAME.g_idx    int32 [in]                    the group of each input column (act-order permutes it)
    NAME.bias     float16 [out]                 when the layer has one

so ``w[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``. ``checkpoint_format``
``"gptq"`` (v1, AutoGPTQ's) stores each zero point minus one; ``"gptq_v2"`` stores it as is.
``quantization_config``: ``quant_method "gptq"``, ``bits``, ``group_size``, ``desc_act``, ``sym``,
``checkpoint_format``. qcore writes v1 for symmetric models and v2 otherwise
(:func:`checkpoint_format`). Imported layers become qcore ``QuantLinear`` modules (codes, float16
scales and zero points carried over exactly) and run on qcore's kernels; the record's chain says
where they came from (``"imported": "gptq"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.formats.packed import to_int32
from qcore.plugin.errors import CheckpointError

QUANT_METHOD = "gptq"
V1, V2 = "gptq", "gptq_v2"
"""``checkpoint_format`` values: v1 stores zero - 1, v2 the zero itself."""
PACKABLE_BITS: tuple[int, ...] = (2, 4, 8)
"""Widths whose codes fill 32-bit words exactly (3-bit GPTQ packing spans words: not read)."""
SUFFIXES: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")


def is_gptq(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a GPTQ checkpoint."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """int32 ``[r, c]`` words -> ``[r * 32 / bits, c]`` codes (each word's values down a column)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    vals = (words.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(-1, words.shape[1])


def unpack_cols(words: Tensor, bits: int) -> Tensor:
    """int32 ``[r, c]`` words -> ``[r, c * 32 / bits]`` codes (each word's values along a row)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    vals = (words.unsqueeze(2) >> shifts[None, None, :]) & ((1 << bits) - 1)
    return vals.reshape(words.shape[0], -1)


def _settings(qc: dict[str, Any], root: Path) -> tuple[int, int, bool, str]:
    bits, group = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
    fmt = str(qc.get("checkpoint_format", qc.get("format", V1)) or V1).lower()
    if bits not in PACKABLE_BITS:
        raise CheckpointError(f"{root}: {bits}-bit GPTQ checkpoints are not read (qcore reads "
                              f"{', '.join(map(str, PACKABLE_BITS))}-bit ones): load it with GPTQModel")
    if fmt not in (V1, V2):
        raise CheckpointError(f"{root}: GPTQ checkpoint_format {fmt!r} is not read (qcore reads {V1!r} and "
                              f"{V2!r}); convert it with GPTQModel")
    return bits, group, bool(qc.get("sym", True)), fmt


def check_layout(tensors: dict[str, Tensor], bits: int) -> None:
    """KeyError for a missing tensor; LayoutError when the tensors are not in the GPTQ layout."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    n_out = qweight.shape[-1] if qweight.dim() == 2 else -1
    ok = (qweight.dtype == qzeros.dtype == torch.int32 and scales.is_floating_point() and qweight.dim() == 2
          and scales.dim() == 2 and scales.shape[1] == n_out and qzeros.shape[0] == scales.shape[0]
          and qzeros.shape[1] * 32 // bits >= n_out)
    if not ok:
        raise LayoutError(f"qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros {tuple(qzeros.shape)} {qzeros.dtype}, "
                          f"scales {tuple(scales.shape)} {scales.dtype} are not the GPTQ layout (int32 qweight "
                          f"[in*{bits}/32, out], int32 qzeros [groups, out*{bits}/32], float scales [groups, out])")


class LayoutError(ValueError):
    """A layer's tensors are not in the layout the checkpoint's quant_method names."""


def layer_weight(tensors: dict[str, Tensor], bits: int, group: int, sym: bool, v1: bool) -> Any:
    """A :class:`~qcore.quant.primitives.QuantizedWeight` from one layer's GPTQ tensors."""
    from qcore.quant.primitives import QuantizedWeight

    check_layout(tensors, bits)
    codes = unpack_rows(tensors["qweight"], bits)  # [in, out]
    n_in, n_out = codes.shape
    zeros = unpack_cols(tensors["qzeros"], bits)[:, :n_out] + (1 if v1 else 0)  # [G, out]
    g_idx = tensors.get("g_idx")
    g_idx = torch.arange(n_in, dtype=torch.int32) // (group if group > 0 else n_in) if g_idx is None else g_idx
    contiguous = torch.equal(g_idx.long(), torch.arange(n_in) // (group if group > 0 else n_in))
    return QuantizedWeight(codes.T.contiguous().to(torch.uint8), tensors["scales"].T.float().contiguous(),
                           zeros.T.float().contiguous(), bits, group if group > 0 else -1, sym,
                           None if contiguous else g_idx.to(torch.int32))


def load(root: Path, config: dict[str, Any], device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """A GPTQ checkpoint as a model with qcore ``QuantLinear`` layers (float16 scales, codes as stored)."""
    from qcore.formats.packed import imported_record, load_layers

    qc = config["quantization_config"]
    bits, group, sym, fmt = _settings(qc, root)
    model = load_layers(root, config, device, dtype, lambda _, parts: layer_weight(parts, bits, group, sym, fmt == V1),
                        SUFFIXES)
    settings = {"bits": bits, "group_size": group, "sym": sym, "desc_act": bool(qc.get("desc_act", False))}
    model.qcore_record = imported_record(QUANT_METHOD, settings, qc, checkpoint_format=fmt)
    return model


# -- export ---------------------------------------------------------------------------------------
KIND = "dir"


def check(model: nn.Module) -> list[str]:
    """Why the GPTQ format cannot hold ``model`` (each reason names the format that can); empty
    when it can."""
    from qcore.formats import packed

    return packed.check(model, "GPTQ", layer_problems)


def layer_problems(layer: Any) -> list[str]:
    """What of one ``QuantLinear`` only the GPTQ format's width rule refuses."""
    from qcore.formats.packed import QCORE_HINT

    if layer.bits not in PACKABLE_BITS:
        return [f"{layer.bits}-bit weights: qcore writes GPTQ packing for {', '.join(map(str, PACKABLE_BITS))} "
                f"bits only (3-bit GPTQ codes span 32-bit words); {QCORE_HINT}"]
    return []


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Codes ``[r, c]`` -> int32 ``[r * bits / 32, c]``: consecutive rows in one word, first lowest."""
    per = 32 // bits
    vals = codes.to(torch.int64).reshape(-1, per, codes.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)[None, :, None]
    return to_int32((vals << shifts).sum(dim=1))


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Codes ``[r, c]`` -> int32 ``[r, c * bits / 32]`` (``c`` padded with zeros to whole words):
    compressed-tensors' packing along rows, qcore's own words."""
    from qcore.formats.compressed_tensors import pack_rows as pack_along_rows

    return pack_along_rows(codes, bits)


def layer_tensors(name: str, layer: Any, fmt: str) -> dict[str, Tensor]:
    """The GPTQ tensors of ``layer`` (see the module docstring)."""
    qw = layer.quantized_weight()
    n_in = layer.in_features
    gs = n_in if qw.group_size == -1 else qw.group_size
    g_idx = qw.g_idx.to(torch.int32) if qw.g_idx is not None else (torch.arange(n_in, dtype=torch.int32) // gs)
    zeros = qw.zeros.round().to(torch.int64).T  # [G, out]
    out = {f"{name}.qweight": pack_rows(qw.codes.T.contiguous(), qw.bits),
           f"{name}.qzeros": pack_cols(zeros - (1 if fmt == V1 else 0), qw.bits),
           f"{name}.scales": qw.scales.T.contiguous().to(torch.float16),
           f"{name}.g_idx": g_idx.contiguous()}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().to(torch.float16).cpu()
    return out


def checkpoint_format(layers: dict[str, Any]) -> str:
    """v1 (AutoGPTQ's, read by every GPTQ loader) for symmetric layers; v2 when a layer is
    asymmetric (readers trust asymmetric v1 only from writers known to store ``zero - 1``
    correctly: GPTQModel refuses it from others) or a zero point is 0 (v1 cannot store -1)."""
    asym = not all(bool(layer.sym) for layer in layers.values())
    any_zero = any(bool((layer.scales_zeros()[1].float() == 0).any()) for layer in layers.values())
    return V2 if asym or any_zero else V1


def write(model: nn.Module, target: Path, tokenizer: Any = None) -> None:
    """Write ``model`` into the folder ``target`` as a GPTQ checkpoint (:func:`checkpoint_format`)."""
    import qcore
    from qcore.formats import ExportError
    from qcore.formats import compressed_tensors as ct
    from qcore.formats.packed import write_checkpoint

    reasons = check(model)
    if reasons:
        raise ExportError("format 'gptq' cannot hold this model: " + "; ".join(reasons))
    layers = ct.quantized_layers(model)
    fmt = checkpoint_format(layers)
    first = next(iter(layers.values()))
    qconfig = {
        "quant_method": QUANT_METHOD, "bits": first.bits, "group_size": first.group_size,
        "sym": all(bool(layer.sym) for layer in layers.values()),
        "desc_act": any(layer.g_idx is not None and not ct._contiguous(layer) for layer in layers.values()),
        "checkpoint_format": fmt, "pack_dtype": "int32", "lm_head": False, "true_sequential": True,
        "quantizer": [f"qcore:{qcore.__version__}"],
    }
    write_checkpoint(model, Path(target), tokenizer, lambda n, layer: layer_tensors(n, layer, fmt), qconfig)
