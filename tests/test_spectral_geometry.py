"""spectral.geometry: output sizes against PyTorch, polyphase splits, tap phases against an FFT."""
import math

import pytest
import torch
import torch.nn.functional as F

from spectral.geometry import (as_tuple, conv_output_size, padding_pairs, polyphase, smallest_multiple, tap_offsets,
                               tap_phases)


@pytest.mark.parametrize("n,k,s,d,p0,p1", [(8, 3, 1, 1, 1, 1), (9, 3, 2, 1, 1, 1), (10, 5, 3, 2, 0, 4),
                                           (7, 1, 2, 1, 0, 0), (6, 3, 1, 3, 2, 0), (5, 4, 2, 1, 3, 1)])
def test_conv_output_size_matches_torch(n, k, s, d, p0, p1):
    x = F.pad(torch.zeros(1, 1, n), [p0, p1])
    expected = F.conv1d(x, torch.zeros(1, 1, k), stride=s, dilation=d).shape[-1]
    assert conv_output_size(n, k, s, d, p0, p1) == expected


def test_conv_output_size_below_one_when_the_kernel_does_not_fit():
    assert conv_output_size(3, 5, 1, 1, 0, 0) < 1


def test_padding_pairs_and_tuples():
    assert padding_pairs("same", (3, 4), (1, 2)) == ((1, 1), (3, 3))
    assert padding_pairs("valid", (3, 3), (1, 1)) == ((0, 0), (0, 0))
    assert padding_pairs((1, 2, 3, 4), (3, 3), (1, 1)) == ((1, 2), (3, 4))
    assert padding_pairs(2, (3, 3), (1, 1)) == ((2, 2), (2, 2))
    assert as_tuple((2,), 2, "stride") == (2, 2)
    with pytest.raises(ValueError, match="stride must be an int or a tuple of 2 ints"):
        as_tuple((1, 2, 3), 2, "stride")
    with pytest.raises(ValueError, match="padding must be non-negative"):
        padding_pairs(-1, (3,), (1,))


def test_smallest_multiple():
    assert [smallest_multiple(n, 3) for n in (1, 3, 4, 6, 7)] == [3, 3, 6, 6, 9]


def test_polyphase_split_reconstructs_offsets_with_phases_in_range():
    for s in (1, 2, 3):
        t = tap_offsets(5, dilation=2, shift=3)
        q, r = polyphase(t, s)
        assert torch.equal(s * q + r, t) and bool(((r >= 0) & (r < s)).all())
    assert torch.equal(tap_offsets(4, 3, modulus=5), torch.tensor([0, 3, 1, 4]))


@pytest.mark.parametrize("k,d,s,n", [(3, 1, 1, 8), (3, 2, 2, 8), (4, 1, 2, 6), (2, 3, 3, 9)])
def test_tap_phases_give_the_fft_of_a_circular_polyphase_kernel(k, d, s, n):
    """Contracting taps with the phases is the DFT (on the coarse grid m = n/s) of each input phase's kernel."""
    torch.manual_seed(0)
    w = torch.randn(k, dtype=torch.float64)
    m = n // s
    q, r = polyphase(tap_offsets(k, d, modulus=n), s)
    E = tap_phases(torch.arange(m), q, r, s, m)  # (m, k, s)
    symbol = torch.einsum("a,uar->ur", w.to(torch.complex128), E)
    for phase in range(s):
        kern = torch.zeros(m, dtype=torch.float64)
        for a in range(k):
            if int(r[a]) == phase:
                kern[int(q[a]) % m] += w[a]
        assert torch.allclose(symbol[:, phase], torch.fft.fft(kern), atol=1e-12)
    conj = tap_phases(torch.arange(m), q, r, s, m, sign=1.0)
    assert torch.allclose(conj, E.conj(), atol=1e-15)
    half = tap_phases(torch.tensor([0.5]), q, r, s, m)
    assert torch.allclose(half[0, torch.arange(k), r], torch.polar(torch.ones(k, dtype=torch.float64),
                                                                   -math.pi * q.double() / m))
