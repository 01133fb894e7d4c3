"""The speed shortcuts of the circular LipLT terms give the values of the full computation.

Half spectrum: for real weights the symbol at (-u, -v) is the conjugate of the one at (u, v), so the first
axis' frequencies u <= m1 / 2 carry every singular value. Reuse: a whole result is cached by weight value.
Ground truth: ``reference_path()`` (every frequency, no reuse) and the dense matrix of the zero-padded piece.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lipschitz import liplt
from lipschitz.liplt import circular_liplt_terms, conv_spec, dense_linear_term, symbol

CASES = [(n, stride, dil) for n, stride, dil in itertools.product((5, 6, 7, 8), (1, 2), (1, 2)) if n % stride == 0]


@pytest.mark.parametrize("n,stride,dil", CASES)
def test_symbol_is_conjugate_symmetric_and_half_the_frequencies_give_the_norm(n, stride, dil):
    g = torch.Generator().manual_seed(n * 10 + stride + 3 * dil)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=dil, dilation=dil, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    spec = conv_spec(conv, (3, n, n))
    K = symbol(spec, (n, n))  # (m1, m2, c_out, c_in s^2)
    m1, m2 = K.shape[:2]
    neg_u, neg_v = (-torch.arange(m1)) % m1, (-torch.arange(m2)) % m2
    torch.testing.assert_close(K[neg_u][:, neg_v], K.conj(), rtol=0, atol=1e-12)
    full = torch.linalg.matrix_norm(K, ord=2).max()
    half = torch.linalg.matrix_norm(K[: m1 // 2 + 1], ord=2).max()
    assert float(half) == pytest.approx(float(full), rel=1e-13)


@pytest.mark.parametrize("n,stride,mode,shortcut", [
    (n, s, mode, sc) for n, s, mode, sc in itertools.product((5, 6, 7, 8), (1, 2), ("zeros", "circular"),
                                                              (None, "conv", "identity"))
    if not (sc == "identity" and s == 2) and not (mode == "circular" and n % s)])
def test_half_spectrum_terms_equal_the_reference_path_and_bound_the_dense_term(n, stride, mode, shortcut):
    torch.manual_seed(100 * n + 10 * stride + len(mode) + len(shortcut or ""))
    cin = 3
    c1 = nn.Conv2d(cin, 4, 3, stride=stride, padding=1, bias=False, padding_mode=mode).double()
    c2 = nn.Conv2d(4, cin if shortcut == "identity" else 5, 3, padding=1, bias=False, padding_mode=mode).double()
    s1 = conv_spec(c1, (cin, n, n), torch.rand(cin, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64))
    m = c1(torch.zeros(1, cin, n, n, dtype=torch.float64)).shape[-1]
    s2 = conv_spec(c2, (4, m, m))
    sc = shortcut
    if shortcut == "conv":
        sc = conv_spec(nn.Conv2d(cin, 5, 1, stride=stride, bias=False, padding_mode=mode).double(), (cin, n, n))
    new = circular_liplt_terms(s1, s2, 0.5, sc, cache={})
    with liplt.reference_path():
        old = circular_liplt_terms(s1, s2, 0.5, sc)
    assert new["bound"] == pytest.approx(old["bound"], rel=1e-12)
    assert new["sum_norm"] == pytest.approx(old["sum_norm"], rel=1e-12)
    if new["mask"]:
        assert (new["c1"], new["c2"]) == pytest.approx((old["c1"], old["c2"]), rel=1e-12)
    assert new["bound"] >= dense_linear_term(s1, s2, 0.5, (cin, n, n), sc) * (1 - 1e-12)


def test_whole_results_are_reused_only_for_equal_weights():
    torch.manual_seed(3)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    s1, s2 = conv_spec(c1, (3, 6, 6)), conv_spec(c2, (4, 6, 6))
    cache: dict = {}
    first = circular_liplt_terms(s1, s2, 0.5, None, cache=cache)
    again = circular_liplt_terms(conv_spec(c1, (3, 6, 6)), conv_spec(c2, (4, 6, 6)), 0.5, None, cache=cache)
    assert again == first and len(cache["liplt_terms"]) == 1
    with torch.no_grad():
        c2.weight[0, 0, 0, 0] += 1e-3  # same shapes, different values: a new entry, a new value
    changed = circular_liplt_terms(s1, conv_spec(c2, (4, 6, 6)), 0.5, None, cache=cache)
    assert len(cache["liplt_terms"]) == 2 and changed["bound"] != first["bound"]
    assert changed["bound"] == circular_liplt_terms(s1, conv_spec(c2, (4, 6, 6)), 0.5, None)["bound"]
    other_split = circular_liplt_terms(s1, s2, 0.25, None, cache=cache)
    assert other_split["bound"] != first["bound"]


@pytest.mark.parametrize("m1,m2", [(1, 1), (4, 4), (5, 5), (5, 4), (4, 7), (9, 6), (33, 33)])
def test_representatives_cover_every_frequency_up_to_conjugation(m1, m2):
    from lipschitz.liplt import _half_spectrum, _representatives

    u = _half_spectrum(m1)
    sel = _representatives(u, m1, m2)
    kept = {(int(a), int(b)) for a, row in zip(u, sel) for b in torch.nonzero(row).flatten()}
    full = {(a, b) for a in range(m1) for b in range(m2)}
    assert {(a, b) for a, b in full if (a, b) in kept or ((-a) % m1, (-b) % m2) in kept} == full
    assert len(kept) == (m1 * m2 + sum((a, b) == ((-a) % m1, (-b) % m2) for a, b in full)) // 2  # none twice


@pytest.mark.parametrize("n", [12, 40])
def test_a_block_the_power_steps_cannot_see_is_still_certified(n):
    from lipschitz.liplt import _max_sv

    g = torch.Generator().manual_seed(n)
    blocks = torch.randn(20, n, n, generator=g, dtype=torch.float64).to(torch.complex128) / n**0.5
    # block 11: its top right singular vector is orthogonal to the all-ones start vector of the power steps
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top = torch.zeros(n, dtype=torch.float64)
    top[0], top[1] = 1.0, -1.0
    top = top / top.norm()
    q[:, 0] = top
    q, _ = torch.linalg.qr(q)
    s = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    s[0] = 5.0
    blocks[11] = (q @ torch.diag(s) @ q.T).to(torch.complex128)
    for reference in (False, True):
        with liplt.reference_path() if reference else torch.no_grad():
            got = _max_sv(blocks)
        assert 5.0 * (1 - 1e-12) <= got <= 5.0 * (1 + 1e-8)
