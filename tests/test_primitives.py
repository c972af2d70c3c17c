"""qcore.quant.primitives against an independent float64 reference (explicit loops over groups)."""
from __future__ import annotations

import math

import pytest
import torch

from qcore.plugin.errors import CompatibilityError
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


def ref_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                 g_idx: torch.Tensor | None = None):
    """Float64, one group at a time: (codes, scales, zeros, w_hat, pre-rounding values)."""
    w = w.double()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    groups = [g_idx[j].item() for j in range(in_f)] if g_idx is not None else [j // gs for j in range(in_f)]
    n_groups = in_f // gs
    maxq = 2**bits - 1
    scales = torch.zeros(out_f, n_groups, dtype=torch.float64)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.float64)
    codes = torch.zeros(out_f, in_f, dtype=torch.float64)
    pre = torch.zeros(out_f, in_f, dtype=torch.float64)
    for r in range(out_f):
        for g in range(n_groups):
            cols = [j for j in range(in_f) if groups[j] == g]
            vals = w[r, cols]
            if sym:
                s = vals.abs().max().item() / (2 ** (bits - 1) - 0.5)
                s = s if s > 0 else 1.0
                z = float(2 ** (bits - 1))
            else:
                lo = min(vals.min().item(), 0.0)
                hi = max(vals.max().item(), 0.0)
                s = (hi - lo) / maxq
                s = s if s > 0 else 1.0
                z = min(max(round(-lo / s), 0), maxq)
            scales[r, g], zeros[r, g] = s, z
            for j in cols:
                v = w[r, j].item() / s + z
                pre[r, j] = v
                codes[r, j] = min(max(math.floor(v + 0.5), 0), maxq)
    w_hat = torch.empty_like(w)
    for j in range(in_f):
        g = groups[j]
        w_hat[:, j] = (codes[:, j] - zeros[:, g]) * scales[:, g]
    return codes, scales, zeros, w_hat, pre


def _near_half(pre: torch.Tensor) -> torch.Tensor:
    return ((pre - pre.floor()) - 0.5).abs() < 1e-3


CASES = [(2, 32, False), (3, 32, True), (4, 64, False), (4, 32, True), (8, -1, False),
         (8, 16, True), (3, -1, False), (4, 24, False), (1, 32, False), (2, -1, True)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_rtn_matches_float64_reference(bits: int, group_size: int, sym: bool) -> None:
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(6, 192) * torch.linspace(0.1, 3.0, 192)
    w[0, :64] = 0.0  # an all-zero group (scale falls back to 1)
    w[1] = w[1].abs() + 0.5  # all-positive row: asymmetric range must include 0
    qw = quantize_rtn(w, bits, group_size, sym)
    codes, scales, zeros, w_hat, pre = ref_quantize(w, bits, group_size, sym)
    assert qw.codes.dtype == torch.uint8 and qw.scales.dtype == torch.float32
    assert torch.allclose(qw.scales.double(), scales, rtol=1e-6, atol=0)
    assert torch.equal(qw.zeros.double(), zeros)
    diff = qw.codes.double() != codes
    assert not (diff & ~_near_half(pre)).any(), "codes differ away from rounding ties"
    assert (qw.codes.double() - codes).abs().max() <= 1
    ok = ~diff
    assert torch.allclose(qw.dequantize().double()[ok], w_hat[ok], rtol=1e-5, atol=1e-6)
    # every value is within half a step of its reconstruction (the range covers min..max)
    step = scales.repeat_interleave(w.shape[1] // scales.shape[1], dim=1)
    assert ((qw.dequantize().double() - w.double()).abs() <= step / 2 + 1e-5).all()


def test_act_order_g_idx_matches_reference() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 64)
    g_idx = (torch.argsort(torch.randperm(64)) // 16).to(torch.int32)  # 4 groups of 16, shuffled
    cols = torch.argsort(g_idx.long(), stable=True)
    scales, zeros = quant_params(w[:, cols], 4, 16, False)  # params from the group's columns
    codes = quantize_codes(w, scales, zeros, 4, 16, g_idx)
    ref_codes, ref_s, ref_z, ref_hat, pre = ref_quantize(w, 4, 16, False, g_idx)
    assert torch.allclose(scales.double(), ref_s, rtol=1e-6)
    assert torch.equal(zeros.double(), ref_z)
    assert not ((codes.double() != ref_codes) & ~_near_half(pre)).any()
    qw = QuantizedWeight(codes, scales, zeros, 4, 16, False, g_idx)
    same = codes.double() == ref_codes
    assert torch.allclose(qw.dequantize().double()[same], ref_hat[same], rtol=1e-5, atol=1e-6)


def test_trivial_g_idx_equals_contiguous_groups() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 128)
    qw = quantize_rtn(w, 3, 32, False)
    g_idx = (torch.arange(128) // 32).to(torch.int32)
    codes = quantize_codes(w, qw.scales, qw.zeros, 3, 32, g_idx)
    assert torch.equal(codes, qw.codes)
    assert torch.equal(dequantize_codes(codes, qw.scales, qw.zeros, 32, g_idx), qw.dequantize())


def test_clip_shrinks_range() -> None:
    torch.manual_seed(2)
    w = torch.randn(3, 64)
    s1, _ = quant_params(w, 4, 32, True)
    clip = torch.full((3, 2), 0.5)
    s2, _ = quant_params(w, 4, 32, True, clip=clip)
    assert torch.allclose(s2, s1 * 0.5)
    qw = quantize_rtn(w, 4, 32, True, clip=0.5)
    assert torch.allclose(qw.scales, s2)


def test_group_size_must_divide() -> None:
    with pytest.raises(CompatibilityError, match=r"does not divide in_features 576.*32, 48, 64"):
        quantize_rtn(torch.randn(2, 576), 4, 128, False)


def test_bad_bits() -> None:
    with pytest.raises(CompatibilityError, match="bits"):
        quantize_rtn(torch.randn(2, 32), 9, 32, False)
    with pytest.raises(CompatibilityError, match="sym=False"):
        quantize_rtn(torch.randn(2, 32), 1, 32, True)


def test_nf4_table_and_reference() -> None:
    table = torch.tensor(NF4_TABLE, dtype=torch.float64)
    assert len(NF4_TABLE) == 16 and table[0] == -1 and table[7] == 0 and table[15] == 1
    assert (table[1:] > table[:-1]).all()
    torch.manual_seed(3)
    w = torch.randn(4, 128)
    codes, absmax = quantize_nf4(w, 64)
    w64 = w.double().reshape(4, 2, 64)
    ref_absmax = w64.abs().amax(-1)
    normed = w64 / ref_absmax.unsqueeze(-1)
    ref_codes = (normed.unsqueeze(-1) - table).abs().argmin(-1).reshape(4, 128)
    assert torch.allclose(absmax.double(), ref_absmax)
    assert torch.equal(codes.long(), ref_codes)
    deq = dequantize_nf4(codes, absmax, 64).double()
    assert torch.allclose(deq, (table[ref_codes].reshape(4, 2, 64) * ref_absmax.unsqueeze(-1)).reshape(4, 128),
                          rtol=1e-6)


def test_nf4_matches_bitsandbytes() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(4)
    w = torch.randn(8, 128)
    try:
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ref = bnbf.dequantize_4bit(q, state)
    except Exception as exc:  # CPU backend missing in this bitsandbytes build
        pytest.skip(f"bitsandbytes CPU nf4 unavailable: {exc}")
    assert torch.allclose(state.code.double(), torch.tensor(NF4_TABLE, dtype=torch.float64), atol=1e-7)
    codes, absmax = quantize_nf4(w, 64)
    assert torch.allclose(dequantize_nf4(codes, absmax, 64), ref, atol=1e-6)
