"""The AWQ GEMM checkpoint format (AutoAWQ / GPTQModel, read by transformers, vLLM, TGI): imported
by ``qcore.load``, written by ``qcore.export(..., format="awq")``.

Per quantized linear ``NAME`` (``out`` x ``in``, 4-bit, ``G = in / group`` groups)::

    NAME.qweight  int32 [in, out / 8]   eight output columns per word, in the order AWQ_ORDER
    NAME.qzeros   int32 [G, out / 8]    zero points, packed the same way
    NAME.scales   float16 [G, out]
    NAME.bias     float16 [out]         when the layer has one

so ``w[o, i] = scales[i // group, o] * (code[i, o] - zero[i // group, o])``; word nibble ``k``
holds column ``AWQ_ORDER[k]`` of its eight. ``quantization_config``: ``quant_method "awq"``,
``version "gemm"``, ``bits 4``, ``group_size``, ``zero_point``. No act-order: a permuted ``g_idx``
is refused on export. Imported layers become qcore ``QuantLinear`` modules (codes, float16 scales
and zero points carried over exactly) and run on qcore's kernels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.formats.packed import QCORE_HINT, to_int32
from qcore.plugin.errors import CheckpointError

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
"""Word nibble k holds output column AWQ_ORDER[k] of its group of eight (AutoAWQ's GEMM layout)."""
PER_WORD = 8
KIND = "dir"


def is_awq(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes an AWQ checkpoint."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def unpack(words: Tensor) -> Tensor:
    """int32 ``[r, c]`` AWQ words -> ``[r, 8c]`` 4-bit values in column order."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=words.device)
    nibbles = (words.unsqueeze(2) >> shifts[None, None, :]) & 0xF  # [r, c, 8]: nibble k
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(PER_WORD)], device=words.device)
    return nibbles[:, :, inverse].reshape(words.shape[0], -1)


def pack(values: Tensor) -> Tensor:
    """``[r, 8c]`` 4-bit values -> int32 ``[r, c]`` AWQ words (the inverse of :func:`unpack`)."""
    vals = values.to(torch.int64).reshape(values.shape[0], -1, PER_WORD)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)[None, None, :]
    return to_int32((vals << shifts).sum(dim=2))


def layer_weight(tensors: dict[str, Tensor], group: int) -> Any:
    """A :class:`~qcore.quant.primitives.QuantizedWeight` from one layer's AWQ tensors."""
    from qcore.quant.primitives import QuantizedWeight

    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if not (qweight.dtype == qzeros.dtype == torch.int32 and scales.is_floating_point() and qweight.dim() == 2
            and scales.dim() == 2 and scales.shape[1] == qweight.shape[1] * PER_WORD
            and qzeros.shape == (scales.shape[0], qweight.shape[1])):
        raise ValueError(f"qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} are not the AWQ GEMM layout (int32 qweight [in, out/8], int32 "
                         "qzeros [groups, out/8], float scales [groups, out])")
    codes = unpack(qweight)  # [in, out]
    n_in, n_out = codes.shape
    zeros = unpack(tensors["qzeros"])[:, :n_out]  # [G, out]
    return QuantizedWeight(codes.T.contiguous().to(torch.uint8), tensors["scales"].T.float().contiguous(),
                           zeros.T.float().contiguous(), BITS, group if 0 < group < n_in else -1, False)


def load(root: Path, config: dict[str, Any], device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """An AWQ GEMM checkpoint as a model with qcore ``QuantLinear`` layers."""
    from qcore.formats.packed import imported_record, load_layers

    qc = config["quantization_config"]
    version = str(qc.get("version", qc.get("format", VERSION))).lower()
    if int(qc.get("bits", 0)) != BITS or version != VERSION:
        raise CheckpointError(f"{root}: AWQ {qc.get('bits')}-bit version {version!r} is not read (qcore reads "
                              f"{BITS}-bit {VERSION!r}, the GEMM layout): load it with AutoAWQ or GPTQModel")
    group = int(qc.get("group_size", -1))
    model = load_layers(root, config, device, dtype, lambda _, parts: layer_weight(parts, group),
                        ("qweight", "qzeros", "scales"))
    settings = {"bits": BITS, "group_size": group, "zero_point": bool(qc.get("zero_point", True))}
    model.qcore_record = imported_record(QUANT_METHOD, settings, qc, version=VERSION)
    return model


# -- export ---------------------------------------------------------------------------------------
def check(model: nn.Module) -> list[str]:
    """Why the AWQ GEMM format cannot hold ``model`` (each reason names the format that can)."""
    from qcore.formats import packed

    return packed.check(model, "AWQ", layer_problems)


def layer_problems(layer: Any) -> list[str]:
    """What of one ``QuantLinear`` only the AWQ GEMM layout refuses."""
    from qcore.formats import compressed_tensors as ct

    problems = []
    if layer.bits != BITS:
        problems.append(f"{layer.bits}-bit weights: the AWQ GEMM layout holds 4-bit weights only; the GPTQ "
                        f"format (2/4/8 bits) or {QCORE_HINT}")
    if layer.g_idx is not None and not ct._contiguous(layer):
        problems.append("act-order groups (a permuted g_idx): AWQ has no g_idx; the GPTQ format holds it")
    if layer.out_features % PER_WORD:
        problems.append(f"output features not a multiple of {PER_WORD} (AWQ packs {PER_WORD} output columns per "
                        f"word); {QCORE_HINT}")
    return problems


def layer_tensors(name: str, layer: Any) -> dict[str, Tensor]:
    """The AWQ GEMM tensors of ``layer`` (see the module docstring)."""
    qw = layer.quantized_weight()
    out = {f"{name}.qweight": pack(qw.codes.T.contiguous()),
           f"{name}.qzeros": pack(qw.zeros.round().to(torch.int64).T.contiguous()),
           f"{name}.scales": qw.scales.T.contiguous().to(torch.float16)}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().to(torch.float16).cpu()
    return out


def write(model: nn.Module, target: Path, tokenizer: Any = None) -> None:
    """Write ``model`` into the folder ``target`` as an AWQ GEMM checkpoint."""
    import qcore
    from qcore.formats import ExportError
    from qcore.formats import compressed_tensors as ct
    from qcore.formats.packed import write_checkpoint

    reasons = check(model)
    if reasons:
        raise ExportError("format 'awq' cannot hold this model: " + "; ".join(reasons))
    layers = ct.quantized_layers(model)
    first = next(iter(layers.values()))
    qc = {"quant_method": QUANT_METHOD, "version": VERSION, "bits": BITS, "group_size": first.group_size,
          "zero_point": True, "quantizer": [f"qcore:{qcore.__version__}"]}
    write_checkpoint(model, Path(target), tokenizer, layer_tensors, qc)
