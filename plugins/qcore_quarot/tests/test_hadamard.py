"""Hadamard constructions, their fast application, and the fusion functions (pure tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from qcore_quarot.hadamard import (
    RANDOM_KIND,
    apply_hadamard,
    describe,
    hadamard_block,
    hadamard_matrix,
    known_hadamard,
    quadratic_character,
    random_signs,
    sylvester,
)
from qcore_quarot.rotate import (
    center_outputs,
    center_rows,
    fold_norm,
    hadamard_rotation,
    per_head,
    rotate_inputs,
    rotate_outputs,
)

SIZES: dict[int, str] = {
    8: "sylvester 8", 16: "sylvester 16", 64: "sylvester 64", 128: "sylvester 128",  # tiny families, heads
    172: "williamson 172",                                                            # stories260K MLP
    576: "paley2 36 x sylvester 16", 1536: "paley1 12 x sylvester 128",              # SmolLM2-135M
    4096: "sylvester 4096", 11008: "williamson 172 x sylvester 64",                   # Llama-2-7B
    14336: "paley1 28 x sylvester 512",                                               # Llama-3-8B
}
"""Every size the tiny families, stories260K, SmolLM2-135M and Llama 2/3 need, and how it is built."""
DENSE_UP_TO = 1536
"""Larger sizes are checked on sampled rows of H (a dense H of 14336 is 1.6 GB in float64)."""


@pytest.mark.parametrize("m", [12, 20, 24, 28, 36, 44, 52, 60, 100, 108, 140, 156, 172])
def test_constructions_are_hadamard(m: int) -> None:
    h, kind = known_hadamard(m)
    assert kind != "sylvester" and h.shape == (m, m)
    assert torch.equal(h.abs(), torch.ones(m, m))
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("q", [9, 25, 27, 49, 19])
def test_quadratic_character_of_prime_power_fields(q: int) -> None:
    """In GF(q) half the nonzero elements are squares and chi(-1) = (-1)^((q-1)/2): each row of
    chi(x_i - x_j) has (q-1)/2 ones, and chi is symmetric for q = 1 (mod 4), skew for q = 3."""
    chi = quadratic_character(q)
    assert torch.equal((chi == 1).sum(1), torch.full((q,), (q - 1) // 2))
    assert torch.equal(chi.T, chi if q % 4 == 1 else -chi)


def _rows(n: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the dense H of size n, built from its Kronecker factors."""
    block, _ = hadamard_block(n)
    p = n // block.shape[0]
    syl = sylvester(p) / math.sqrt(p)
    return torch.stack([torch.kron(block[int(r) // p], syl[int(r) % p]) for r in rows])


@pytest.mark.parametrize("n", sorted(SIZES))
def test_fast_transform_is_orthogonal_and_equals_dense(n: int) -> None:
    assert describe(n) == SIZES[n]
    block, kind = hadamard_block(n)
    assert kind != RANDOM_KIND
    assert torch.allclose(block @ block.T, torch.eye(block.shape[0], dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    fast = apply_hadamard(x, n)
    if n <= DENSE_UP_TO:
        h = hadamard_matrix(n)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(fast, x @ h.T, atol=1e-12)
    else:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64]
        h = _rows(n, rows)
        assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(fast[:, rows], x @ h.T, atol=1e-12)
    assert torch.allclose(fast.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    fast32 = apply_hadamard(x.float(), n)
    assert fast32.dtype == torch.float32 and float((fast32 - fast).norm() / fast.norm()) < 1e-6


def test_sizes_without_a_construction_get_a_seeded_random_orthogonal_block() -> None:
    block, kind = hadamard_block(188, seed=3)  # 4 x 47: no Paley, no Williamson sequence for 47
    assert kind == RANDOM_KIND and block.shape == (47, 47) and describe(188, 3) == "random-orthogonal 47 x sylvester 4"
    assert torch.allclose(block @ block.T, torch.eye(47, dtype=torch.float64), atol=1e-12)
    assert torch.equal(hadamard_block(188, seed=3)[0], block)
    assert not torch.allclose(hadamard_block(188, seed=4)[0], block)
    h = hadamard_matrix(188, seed=3)
    x = torch.randn(2, 188, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x, 188, seed=3), x @ h.T, atol=1e-12)
    with pytest.raises(ValueError, match="not 64"):
        apply_hadamard(x, 64)


def test_random_signs_are_seeded() -> None:
    s = random_signs(64, 0)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(64, 0)) and not torch.equal(s, random_signs(64, 1))


def _linear_problem(out: int = 12, inp: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((5, inp), (out, inp), (out,)))


def test_rotated_weights_compute_the_same_function() -> None:
    x, w, b = _linear_problem()
    rot = hadamard_rotation(hadamard_block(16)[0], random_signs(16, 0))
    assert torch.allclose(rot(x) @ rotate_inputs(w, rot).T, x @ w.T, atol=1e-12)  # reads x R
    x2, w2, b2 = _linear_problem(out=16, inp=12)
    w_out, b_out = rotate_outputs(w2, b2, rot)
    assert torch.allclose(x2 @ w_out.T + b_out, rot(x2 @ w2.T + b2), atol=1e-12)  # writes y R
    heads = per_head(hadamard_rotation(hadamard_block(4)[0]), 4)
    assert torch.allclose(heads(x), torch.cat([apply_hadamard(c, 4) for c in x.split(4, -1)], -1), atol=1e-12)


def test_fold_norm_and_centring() -> None:
    x, w, b = _linear_problem()
    x_hat = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    nw, nb = torch.rand(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    for offset in (0.0, 1.0):  # x_hat * (offset + w) + b: plain and Gemma-style norms
        wf, bf = fold_norm(w, b, nw, nb, offset)
        assert torch.allclose(x_hat @ wf.T + bf, (x_hat * (offset + nw) + nb) @ w.T + b, atol=1e-12)
    wc, bc = center_outputs(w, b)
    assert torch.allclose((x @ wc.T + bc).mean(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(center_rows(x).mean(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
