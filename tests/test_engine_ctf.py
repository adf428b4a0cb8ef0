"""Pin the CTF sign and astigmatism conventions against an independent formula."""

import math

import torch

from napari_class2d.engine.ctf import ctf_at, ctf_values
from napari_class2d.engine.fourier import FourierGrid


def independent_ctf(grid, apix, du, dv, angle_deg, kv=300.0, cs_mm=2.7, q=0.1):
    """RELION's CTF written out by hand: positive first lobe for underfocus (Å)."""
    kx = grid.kx / (grid.box * apix)
    ky = grid.ky / (grid.box * apix)
    k2 = kx**2 + ky**2
    phi = torch.atan2(ky, kx)
    df = (du + dv) / 2 + (du - dv) / 2 * torch.cos(2 * (phi - math.radians(angle_deg)))
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1 + 0.978466e-6 * volts))  # Å
    chi = math.pi * lam * df * k2 - math.pi / 2 * cs_mm * 1e7 * lam**3 * k2**2
    return math.sqrt(1 - q * q) * torch.sin(chi) + q * torch.cos(chi)


def test_ctf_matches_relion_convention():
    grid = FourierGrid.create(64)
    apix = 1.5
    params = torch.tensor([[21000.0, 16000.0, 35.0, 300.0, 2.7, 0.1, 0.0, 0.0]])
    ours = ctf_values(params, grid, apix)[0]
    ref = independent_ctf(grid, apix, 21000.0, 16000.0, 35.0)
    assert torch.allclose(ours, ref, atol=5e-3)
    # first lobe positive: particles with white density stay white at low frequency
    low = grid.radius < 2
    assert torch.all(ours[low] > 0)
    # swapping the astigmatism axis by 90 degrees must change the values
    other = ctf_values(torch.tensor([[21000.0, 16000.0, 125.0, 300, 2.7, 0.1, 0, 0]]), grid, apix)
    assert (other[0] - ours).abs().max() > 0.5


def test_bfactor_damps_high_frequencies():
    grid = FourierGrid.create(64)
    p = torch.tensor([[15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0]])
    pb = p.clone()
    pb[0, 7] = 200.0
    a, b = ctf_values(p, grid, 2.0)[0], ctf_values(pb, grid, 2.0)[0]
    hi = grid.radius > 25
    assert (b[hi].abs() < a[hi].abs() + 1e-6).all()
    assert b[hi].abs().sum() < 0.5 * a[hi].abs().sum()


def test_direct_evaluation_matches_torch_ctf():
    grid = FourierGrid.create(48)
    params = torch.tensor(
        [
            [21000.0, 16000.0, 35.0, 300.0, 2.7, 0.1, 0.0, 0.0],
            [12000.0, 11000.0, 170.0, 200.0, 1.4, 0.07, 40.0, 50.0],
        ]
    )
    torch.testing.assert_close(
        ctf_at(params, grid, 2.0), ctf_values(params, grid, 2.0), atol=2e-3, rtol=0
    )


def test_defocus_v_larger_than_u_is_the_same_ctf_turned():
    grid = FourierGrid.create(48)
    a = ctf_values(torch.tensor([[16000.0, 21000.0, 20.0, 300, 2.7, 0.1, 0, 0]]), grid, 2.0)
    b = ctf_values(torch.tensor([[21000.0, 16000.0, 110.0, 300, 2.7, 0.1, 0, 0]]), grid, 2.0)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    ref = independent_ctf(grid, 2.0, 16000.0, 21000.0, 20.0)
    torch.testing.assert_close(a[0], ref, atol=5e-3, rtol=0)
