"""Packing low-bit codes into int32: exact round trips (hypothesis) and the documented layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.plugin.errors import CompatibilityError
from qcore.quant.packing import pack_codes, packed_words, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), rows=st.integers(1, 5),
       cols=st.integers(1, 130), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits: int, rows: int, cols: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_words(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), data=st.data())
def test_round_trip_extreme_values(bits: int, data: st.DataObject) -> None:
    cols = data.draw(st.integers(1, 70))
    vals = data.draw(st.lists(st.sampled_from([0, 2**bits - 1, 2 ** (bits - 1)]), min_size=cols, max_size=cols))
    codes = torch.tensor([vals], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, cols), codes)


def test_words_per_row() -> None:
    assert packed_words(4096, 4) == 512
    assert packed_words(4096, 3) == 384  # in * bits / 32
    assert packed_words(4096, 2) == 256
    assert packed_words(4096, 8) == 1024
    assert packed_words(33, 4) == 8  # padded to 64 codes


def test_layout_is_lsb_first_bit_stream() -> None:
    # 4 bits: code j sits at bits 4j..4j+3 of word 0
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15] + [0] * 24], dtype=torch.uint8)
    word = pack_codes(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0xF7654321
    # 3 bits: code 10 straddles words 0 and 1 (bits 30..32)
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 7
    p = pack_codes(codes, 3)
    assert (p[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30
    assert p[0, 1].item() == 1
    assert p[0, 2].item() == 0


def test_out_of_range_codes_refused() -> None:
    with pytest.raises(CompatibilityError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(CompatibilityError, match="expected"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.int32), 4, 64)
