"""Pose, projection and CTF conventions of the simulator, against independent formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_class2d.sim.ctf import relion_ctf_2d
from napari_class2d.sim.phantom import default_phantom
from napari_class2d.sim.project import FourierProjector
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import (
    euler_to_matrix,
    matrix_to_euler,
    rotate_and_shift,
)

BOX, APIX = 64, 3.0
RADIUS_A = 0.3 * BOX * APIX


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):  # much faster for these small tensors on 2-core machines
        yield


@pytest.fixture(scope="module")
def phantom_volume():
    ph = default_phantom()
    return ph, ph.render(BOX, APIX, RADIUS_A)


def _corr(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_euler_matrix_is_relion_zyz():
    # RELION: psi alone is [[c, s, 0], [-s, c, 0], [0, 0, 1]]; tilt about y; direction row 3
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    np.testing.assert_allclose(
        euler_to_matrix(0, 0, 30), [[c, s, 0], [-s, c, 0], [0, 0, 1]], atol=1e-12
    )
    A = euler_to_matrix(40.0, 70.0, -20.0)
    np.testing.assert_allclose(A @ A.T, np.eye(3), atol=1e-12)
    d = np.deg2rad
    np.testing.assert_allclose(
        A[2], [np.sin(d(70)) * np.cos(d(40)), np.sin(d(70)) * np.sin(d(40)), np.cos(d(70))]
    )
    np.testing.assert_allclose(matrix_to_euler(A), (40.0, 70.0, -20.0), atol=1e-9)


def test_phantom_is_asymmetric(phantom_volume):
    """No mirror plane and no 2-fold axis: a symmetric object would correlate ~1."""
    _, vol = phantom_volume
    v = vol.numpy()
    # flips about the centre voxel D//2 (flip, then roll by one voxel for an even box)
    ops = [np.roll(np.flip(v, ax), 1, ax) for ax in range(3)]
    ops += [np.roll(np.rot90(v, 2, ax), (1, 1), ax) for ax in ((0, 1), (1, 2), (0, 2))]
    for other in ops:
        assert _corr(v, other) < 0.8


def test_fourier_projection_matches_analytic_projection(phantom_volume):
    ph, vol = phantom_volume
    A = euler_to_matrix([0, 30, 100, -45], [0, 40, 120, 90], [0, 50, -70, 10])
    fourier = FourierProjector(vol).project_matrices(A).numpy()
    exact = ph.project(A, BOX, APIX, RADIUS_A).numpy()
    for f, e in zip(fourier, exact, strict=True):
        assert _corr(f, e) > 0.9999
        assert np.abs(f - e).max() < 0.03 * e.max()
    # identity orientation: the projection is the plain sum along z (array axis 0)
    np.testing.assert_allclose(exact[0], vol.sum(0).numpy(), atol=1e-3 * exact[0].max())


def test_rotate_and_shift_is_relion_psi_and_origin():
    """rotate_and_shift(P(rot, tilt, 0), psi, t) == P(rot, tilt, psi) moved by t."""
    ph = default_phantom()
    psi, shift_A = 50.0, np.array([6.0, -9.0])  # x right, y down (rows)
    P0 = ph.project(euler_to_matrix(30, 40, 0), BOX, APIX, RADIUS_A)[0]
    P1 = ph.project(euler_to_matrix(30, 40, psi), BOX, APIX, RADIUS_A)[0]
    got = rotate_and_shift(P0, psi, shift_A, APIX).numpy()
    dx, dy = (shift_A / APIX).astype(int)  # whole pixels: compare against np.roll
    expected = np.roll(P1.numpy(), (dy, dx), axis=(0, 1))
    assert _corr(got, expected) > 0.9999
    # undo: shift by -t then rotate by +psi (RELION's rlnOriginXAngst = -t_x re-centres)
    back = rotate_and_shift(rotate_and_shift(got, 0.0, -shift_A, APIX), -psi, [0, 0], APIX)
    assert _corr(back, P0) > 0.999


def test_shift_moves_content_right_and_down():
    img = torch.zeros(32, 32)
    img[16, 16] = 1.0
    out = rotate_and_shift(img, 0.0, [2 * APIX, 3 * APIX], APIX)
    assert tuple(np.unravel_index(int(out.argmax()), out.shape)) == (19, 18)  # (row, col)


def _relion_ctf_numpy(du, dv, ang_deg, kv, cs_mm, q, apix, box):
    """RELION's CTF (ctf.h) written out independently, on the rfft2 grid."""
    volts = kv * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))
    fy = np.fft.fftfreq(box)[:, None] / apix
    fx = np.fft.rfftfreq(box)[None, :] / apix
    s2 = fx**2 + fy**2
    phi = np.arctan2(fy, fx)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (phi - np.deg2rad(ang_deg)))
    k1, k2 = np.pi * lam, 0.5 * np.pi * cs_mm * 1e7 * lam**3
    k3 = np.arctan(q / np.sqrt(1 - q * q))
    argument = k1 * (-defocus) * s2 + k2 * s2 * s2 - k3
    return -np.sin(argument)


def test_ctf_follows_relion_sign_units_and_angle():
    du, dv, ang = 15000.0, 13500.0, 30.0
    got = relion_ctf_2d([du], [dv], [ang], 300.0, 2.7, 0.1, 1.5, 128)[0].numpy()
    expected = _relion_ctf_numpy(du, dv, ang, 300.0, 2.7, 0.1, 1.5, 128)
    assert abs(got[0, 0] - 0.1) < 1e-6  # +Q at the origin: positive density stays white
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # the angle matters: 30° and 120° differ (would not if the angle were ignored)
    other = _relion_ctf_numpy(du, dv, ang + 90, 300.0, 2.7, 0.1, 1.5, 128)
    assert np.abs(got - other).max() > 0.5


def test_ctf_refuses_swapped_defocus():
    with pytest.raises(ValueError, match="defocus U must be >= defocus V"):
        relion_ctf_2d([10000.0], [12000.0], [0.0], 300.0, 2.7, 0.1, 1.5, 32)
