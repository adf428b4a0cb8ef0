"""Without CTF correction, the Wiener filter trusts no ring of a class more than the rings
below it.

A class of particles agrees best at low resolution when the CTF does not modulate its
signal; a class whose two half sets agree on fine detail but not on the coarse shape
agrees on a pattern both were aligned to (the noise textures of issue 12). These tests
build the half-set statistics of such classes directly and check the signal the filter
is given.
"""

from __future__ import annotations

import torch

from napari_class2d.engine.fourier import FourierGrid
from napari_class2d.engine.reconstruct import FIRST_RING, falling_frc, half_set_signal

BOX, N_PER_HALF = 48, 40


def test_falling_frc_is_the_running_minimum_from_the_first_ring():
    frc = torch.tensor(
        [[0.9, 0.8, 0.5, 0.1, 0.9, 0.95, 0.2, 0.3], [1, 1, 1, 0.9, 0.8, 0.85, 0.7, 0.1]]
    )
    out = falling_frc(frc)
    assert torch.equal(out[:, :FIRST_RING], frc[:, :FIRST_RING])  # the lowest rings as measured
    tail = out[:, FIRST_RING:]
    assert bool((tail[:, 1:] <= tail[:, :-1]).all())
    assert torch.allclose(out[0, FIRST_RING:], torch.full((5,), 0.1))
    assert torch.allclose(out[1], torch.tensor([1, 1, 1, 0.9, 0.8, 0.8, 0.7, 0.1]))
    assert torch.equal(falling_frc(frc[:, :FIRST_RING]), frc[:, :FIRST_RING])


def _half_sets(grid: FourierGrid, shared_from_ring: int, gen: torch.Generator):
    """``num, den`` ``(2, 1, F)`` of a class of ``N_PER_HALF`` particles per half: a signal
    common to both halves at rings ``>= shared_from_ring``, below that each half its own."""
    f = grid.n
    signal = torch.randn(f, dtype=torch.complex64, generator=gen)
    own = torch.randn(2, f, dtype=torch.complex64, generator=gen)
    noise = torch.randn(2, f, dtype=torch.complex64, generator=gen) / N_PER_HALF**0.5
    common = grid.ring >= shared_from_ring
    mean = torch.where(common, signal, own) + noise
    den = torch.full((2, 1, f), float(N_PER_HALF))
    return (mean * N_PER_HALF)[:, None], den


def _two_classes():
    grid = FourierGrid.create(BOX)
    gen = torch.Generator().manual_seed(0)
    num_p, den_p = _half_sets(grid, 0, gen)  # particles: the halves agree at every ring
    num_t, den_t = _half_sets(grid, 8, gen)  # a texture: they agree from ring 8 on only
    return grid, torch.cat([num_p, num_t], 1), torch.cat([den_p, den_t], 1)


def test_a_class_agreeing_only_on_fine_detail_gets_no_signal_there():
    grid, num, den = _two_classes()
    tau2, frc = half_set_signal(num, den, grid, regularisation=2.0, falling=True)
    fine = slice(8, grid.n_rings - 1)
    # the measured FRC is high at fine detail for both classes ...
    assert float(frc[0, fine].min()) > 0.9 and float(frc[1, fine].min()) > 0.9
    assert float(frc[1, FIRST_RING:8].max()) < 0.5
    # ... but only the class that also agrees on the coarse rings keeps its fine signal
    assert float((tau2[1, fine] / tau2[0, fine]).max()) < 0.05


def test_ctf_corrected_jobs_keep_the_measured_frc():
    """With the CTF corrected the FRC of a real class is low where the CTF is weak (the
    lowest rings) and higher at its first maximum, so the rule is off there."""
    grid, num, den = _two_classes()
    kept, _ = half_set_signal(num, den, grid, regularisation=2.0)
    fine = slice(8, grid.n_rings - 1)
    assert float((kept[1, fine] / kept[0, fine]).min()) > 0.5  # the texture's as measured
