"""Orthonormal Hadamard transforms of the sizes LLMs use, and their fast application.

Pure tensor functions. A Hadamard matrix of order n has entries +-1 and ``H @ H.T == n * I``, so
``H / sqrt(n)`` is orthogonal. A size ``n = m * 2**k`` is built as ``kron(H_m, H_{2**k})``,
applied to a vector as butterflies (the fast Walsh-Hadamard transform) over the ``2**k`` part and
a small matmul over the m part. ``H_m`` comes from the first construction that covers m:

* Sylvester: powers of two;
* Paley I: ``m = q + 1`` for a prime power ``q = 3 (mod 4)``: 12, 20, 24, 28 (q = 27), 44, 60, 108, 140...;
* Paley II: ``m = 2 (q + 1)`` for a prime power ``q = 1 (mod 4)``: 36 (q = 17), 52 (q = 25), 76, 100...;
* Williamson: ``m = 4 t`` from four circulant +-1 blocks of order t with published first rows
  (:data:`WILLIAMSON_ROWS`): 156 (t = 39), 172 (t = 43).

A prime power ``q = p**e`` uses GF(q) arithmetic: polynomials over GF(p) modulo an irreducible one.
A size none of these covers (188 = 4 x 47, any odd part above :data:`MAX_BLOCK`) gets a seeded
random orthogonal block (QR of a Gaussian) in place of ``H_m``: still orthogonal and fast, but
not a Hadamard matrix; :func:`hadamard_block` says which kind a size got.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
from torch import Tensor

WILLIAMSON_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}
"""First rows of the circulant blocks A, B, C, D of a Williamson-type Hadamard matrix of order
``4 t``, by t ('+' is 1, '-' is -1). t = 43: M. Hall, Combinatorial Theory (1983); t = 39: Long
(2013); as tabulated in SageMath's ``williamson_type_quadruples_smallcases``."""

MAX_BLOCK: int = 1024
"""Largest order m a construction is tried for (building one costs O(m**2))."""

RANDOM_KIND = "random-orthogonal"
"""The kind of a size no construction covers."""

Poly = tuple[int, ...]
"""A polynomial over GF(p): its coefficients, lowest degree first."""


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sylvester(n: int) -> Tensor:
    """The +-1 Sylvester-Hadamard matrix of order n (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q == p**e`` and p prime, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _mul_mod(a: Poly, b: Poly, f: Poly, p: int) -> Poly:
    """``a * b`` modulo the monic polynomial f over GF(p) (a and b of degree below f's)."""
    e = len(f) - 1
    prod = [0] * (2 * e - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] += x * y
    for d in range(2 * e - 2, e - 1, -1):
        c = prod[d] % p
        for i in range(e + 1):
            prod[d - e + i] -= c * f[i]
    return tuple(c % p for c in prod[:e])


def field_modulus(p: int, e: int) -> Poly:
    """A monic irreducible polynomial of degree e over GF(p): the first whose quotient ring has
    no zero divisors (so it is the field GF(p**e))."""
    if e == 1:
        return (0, 1)
    nonzero = list(itertools.product(range(p), repeat=e))[1:]
    for tail in itertools.product(range(p), repeat=e):
        f = (*tail, 1)
        if all(any(_mul_mod(a, b, f, p)) for a in nonzero for b in nonzero):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # one always exists


def quadratic_character(q: int) -> Tensor:
    """``chi(x_i - x_j)`` over the elements of GF(q), q an odd prime power: int64 ``[q, q]``,
    1 where the difference is a nonzero square, -1 where it is not a square, 0 on the diagonal."""
    found = prime_power(q)
    if found is None or q % 2 == 0:
        raise ValueError(f"{q} is not an odd prime power")
    p, e = found
    f = field_modulus(p, e)
    elements = list(itertools.product(range(p), repeat=e))
    place = torch.tensor([p**i for i in range(e)])
    squares = torch.zeros(q, dtype=torch.bool)
    for a in elements[1:]:
        squares[int((torch.tensor(_mul_mod(a, a, f, p)) * place).sum())] = True
    digits = torch.tensor(elements)
    diff = (((digits[:, None, :] - digits[None, :, :]) % p) * place).sum(-1)
    chi = torch.where(squares[diff], 1, -1)
    return chi.fill_diagonal_(0)


def paley1(q: int) -> Tensor:
    """Hadamard matrix of order ``q + 1`` for a prime power ``q = 3 (mod 4)``: ``I + S`` with S the
    skew conference matrix ``[[0, 1], [-1, chi]]``."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, quadratic_character(q).double()
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> Tensor:
    """Hadamard matrix of order ``2 (q + 1)`` for a prime power ``q = 1 (mod 4)``, from the
    symmetric conference matrix ``C = [[0, 1], [1, chi]]``: ``C x [[1, 1], [1, -1]] + I x [[1, -1], [-1, -1]]``."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, quadratic_character(q).double()
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    two = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), two)


def circulant(row: str) -> Tensor:
    """The circulant +-1 matrix whose first row is ``row`` ('+' / '-'), float64."""
    v = torch.tensor([1.0 if c == "+" else -1.0 for c in row], dtype=torch.float64)
    n = v.numel()
    return v[(torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n]


def williamson(t: int) -> Tensor:
    """Hadamard matrix of order ``4 t`` from the circulant blocks of :data:`WILLIAMSON_ROWS`."""
    a, b, c, d = (circulant(r) for r in WILLIAMSON_ROWS[t])
    rows = ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])
    return torch.cat([torch.cat(r, 1) for r in rows], 0)


def known_hadamard(m: int) -> tuple[Tensor, str] | None:
    """A +-1 Hadamard matrix of order m (float64) and its construction's name, or None."""
    if is_power_of_two(m):
        return sylvester(m), "sylvester"
    if m > MAX_BLOCK or m % 4:
        return None
    q = m - 1
    if q % 4 == 3 and prime_power(q):
        return paley1(q), "paley1"
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q):
        return paley2(q), "paley2"
    if m // 4 in WILLIAMSON_ROWS:
        return williamson(m // 4), "williamson"
    return None


def random_orthogonal(m: int, seed: int) -> Tensor:
    """A Haar-random orthogonal ``[m, m]`` matrix (QR of a seeded Gaussian), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


@lru_cache(maxsize=None)
def hadamard_block(n: int, seed: int = 0) -> tuple[Tensor, str]:
    """``(B, kind)`` for the orthogonal size-n transform ``H = kron(B, H_p / sqrt(p))``: B the
    orthonormal float64 ``[m, m]`` factor (m = 1 for powers of two, p = n / m a power of two) and
    the construction that gave it (``sylvester``, ``paley1``, ``paley2``, ``williamson`` or
    ``random-orthogonal``, seeded by ``seed``). Cached: treat B as read-only."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):
        m = n >> k
        found = known_hadamard(m)
        if found is not None:
            return found[0] / math.sqrt(m), found[1]
    return random_orthogonal(n >> twos, seed), RANDOM_KIND


def describe(n: int, seed: int = 0) -> str:
    """How size n is built, e.g. ``paley2 36 x sylvester 16``."""
    block, kind = hadamard_block(n, seed)
    m = block.shape[0]
    if m == 1:
        return f"sylvester {n}"
    return f"{kind} {m}" + (f" x sylvester {n // m}" if n > m else "")


def fwht(x: Tensor) -> Tensor:
    """Unnormalized Walsh-Hadamard transform over the last dimension (a power of two): ``x @ H``
    with H Sylvester's (symmetric), by ``log2(n)`` butterfly stages."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def hadamard_transform(x: Tensor, block: Tensor) -> Tensor:
    """``x @ H.T`` over the last dimension for ``H = kron(block, H_p / sqrt(p))``: butterflies over
    the p part, then ``block`` (``[m, m]``) over the m part; ``x.shape[-1] == m * p``."""
    n, m = x.shape[-1], block.shape[0]
    p = n // m
    if p * m != n or not is_power_of_two(p):
        raise ValueError(f"size {n} is not {m} x a power of two")
    y = fwht(x.reshape(*x.shape[:-1], m, p)) * p**-0.5
    if m > 1:  # one GEMM: [..., p, m] @ block.T
        y = (y.transpose(-1, -2) @ block.to(device=y.device, dtype=y.dtype).T).transpose(-1, -2)
    return y.reshape(x.shape)


def apply_hadamard(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """``x @ H.T`` over x's last dimension (of size n) for the orthonormal size-n transform of
    :func:`hadamard_block` (``seed`` only matters for sizes without a construction)."""
    if x.shape[-1] != n:
        raise ValueError(f"the last dimension of x is {x.shape[-1]}, not {n}")
    return hadamard_transform(x, hadamard_block(n, seed)[0])


def hadamard_matrix(n: int, seed: int = 0) -> Tensor:
    """The dense orthonormal float64 ``[n, n]`` matrix :func:`apply_hadamard` applies."""
    block, _ = hadamard_block(n, seed)
    p = n // block.shape[0]
    return torch.kron(block, sylvester(p) / math.sqrt(p))


def random_signs(n: int, seed: int) -> Tensor:
    """Seeded +-1 float64 ``[n]``: the diagonal D of QuaRot's random Hadamard ``H D``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
