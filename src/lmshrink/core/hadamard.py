"""Hadamard matrices and the orthogonal transforms built from them (rotations of activations and weights).

``hadamard_matrix(n)`` is a fixed ``n x n`` matrix of +-1 with ``H H^T = n I``, built as ``H_m kron S_p`` where
``p`` is the largest power of two with ``n = m p`` and a known construction for ``m``: Sylvester's for ``m = 1``,
Paley's first for ``m = q + 1`` (``q`` a prime, ``q = 3 mod 4``), Paley's second for ``m = 2 (q + 1)`` (``q`` a
prime, ``q = 1 mod 4``). That covers every power of two and e.g. 12 * 2^k (q = 11), 20 * 2^k, 24 * 2^k, 36 * 2^k
(q = 17): SmolLM2's 576 = 36 * 16, 1536 = 12 * 128 and its head dimension 64. The constructions are
deterministic and checked when built, so a saved model's online transforms are rebuilt exactly.

``hadamard_transform(x)`` computes ``x @ Q`` along the last dimension with ``Q = H / sqrt(n)`` orthogonal, from the
two Kronecker factors (``m^2 p + m p^2`` products per row instead of ``n^2``).
"""

from __future__ import annotations

import functools

import torch

from lmshrink.core.errors import LmshrinkError


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    idx = torch.arange(q)
    return torch.tensor([[_legendre(int(j - i), q) for j in idx] for i in idx], dtype=torch.float64)


def _base_construction(m: int) -> str | None:
    """How an order-``m`` Hadamard matrix is built here, or None."""
    if m == 1:
        return "sylvester"
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m * p``, ``p`` the largest power of two for which order ``m`` has a construction here."""
    if n < 1:
        return None
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        if _base_construction(n // p) is not None:
            return n // p, p
        p //= 2
    return None


def check_hadamard_size(n: int, what: str) -> None:
    """Raise an LmshrinkError naming ``what`` when no Hadamard matrix of order ``n`` is built here."""
    if hadamard_factors(n) is None:
        raise LmshrinkError(f"{what} is {n}, and lmshrink builds no Hadamard matrix of that order (it builds "
                            "m * 2^k for m = 1, q + 1 with q a prime = 3 mod 4, 2 (q + 1) with q a prime = 1 mod 4)",
                            fix="leave this model or layer out of the rotation")


@functools.lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor:
    kind = _base_construction(m)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.float64)
    if kind == "paley1":
        q = m - 1
        h = torch.empty(m, m, dtype=torch.float64)
        h[0, :] = 1
        h[1:, 0] = -1
        h[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.float64)
        return h
    if kind == "paley2":
        q = m // 2 - 1
        conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        conference[0, 1:] = 1
        conference[1:, 0] = 1
        conference[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    raise LmshrinkError(f"no Hadamard construction of order {m}", fix="use a size hadamard_factors accepts")


@functools.lru_cache(maxsize=None)
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    factors = hadamard_factors(n)
    if factors is None:
        check_hadamard_size(n, "the transform size")
    m, p = factors
    a, b = _base(m), _sylvester(p)
    for name, h in (("base", a), ("sylvester", b)):
        k = h.shape[0]
        if not torch.equal(h @ h.t(), k * torch.eye(k, dtype=torch.float64)):
            raise AssertionError(f"the {name} Hadamard matrix of order {k} is not orthogonal")
    return a, b


def hadamard_matrix(n: int) -> torch.Tensor:
    """The +-1 matrix of order ``n`` (float64), ``H H^T = n I``."""
    a, b = _factors(n)
    return torch.kron(a, b)


def orthogonal_hadamard(n: int, seed: int | None = None) -> torch.Tensor:
    """``D H / sqrt(n)`` in float64: orthogonal; ``D`` a diagonal of random signs drawn from ``seed`` (the
    identity when ``seed`` is None)."""
    q = hadamard_matrix(n) / n ** 0.5
    if seed is None:
        return q
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1
    return signs[:, None] * q


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ (H / sqrt(n))`` along the last dimension (``n = x.shape[-1]``), in ``x``'s dtype."""
    n = x.shape[-1]
    a, b = _factors(n)
    m, p = a.shape[0], b.shape[0]
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], m, p)
    if p > 1:
        xf = xf @ b.to(xf)  # [.., m, p] @ [p, p]
    if m > 1:
        xf = a.t().to(xf) @ xf  # row i of H_m kron S_p mixes the m blocks through H_m[i, a]
    return (xf.reshape(x.shape) * (1.0 / n ** 0.5)).to(x.dtype)


__all__ = ["hadamard_matrix", "hadamard_factors", "hadamard_transform", "orthogonal_hadamard",
           "check_hadamard_size"]
