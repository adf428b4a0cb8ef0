"""Small in-memory 2D ground-truth particle sets for engine tests (no files needed)."""

from __future__ import annotations

import math

import numpy as np
import torch

from napari_class2d.engine.ctf import CTF_COLUMNS, ctf_values
from napari_class2d.engine.fourier import FourierGrid, rotate_images
from napari_class2d.io.particles import CTFParams, ParticleSet


def blob_views(n_views: int, box: int, seed: int = 1) -> np.ndarray:
    """Distinct asymmetric 2D 'views': sums of 3-5 Gaussian blobs inside about 45 % of the box."""
    rng = np.random.default_rng(seed)
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    views = np.zeros((n_views, box, box), np.float32)
    for v in range(n_views):
        for _ in range(rng.integers(3, 6)):
            cx, cy = rng.uniform(-0.15, 0.15, 2) * box
            sx, sy = rng.uniform(0.03, 0.07, 2) * box
            a = rng.uniform(0, math.pi)
            xr = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
            yr = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
            views[v] += rng.uniform(0.5, 1.0) * np.exp(-0.5 * ((xr / sx) ** 2 + (yr / sy) ** 2))
    return views


def make_particles(
    n: int,
    box: int = 48,
    pixel_size_A: float = 4.0,
    n_views: int = 4,
    snr: float = 0.5,
    ctf: bool = True,
    seed: int = 0,
    populations: np.ndarray | None = None,
    max_shift_px: float = 2.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
):
    """Particles of known views at random in-plane rotations and shifts, with CTF and noise.

    Returns ``(ParticleSet, labels, psi_deg, shifts_px, views)``; a particle is its view
    rotated counter-clockwise by ``psi`` then shifted by ``shift`` (x, y) pixels
    (uniform within ``max_shift_px`` around ``offset_px``).
    """
    rng = np.random.default_rng(seed)
    views = blob_views(n_views, box, seed + 1)
    p = populations if populations is not None else np.full(n_views, 1.0 / n_views)
    labels = rng.choice(n_views, n, p=p / p.sum())
    psi = rng.uniform(0, 360, n)
    shifts = rng.uniform(-max_shift_px, max_shift_px, (n, 2)) + np.asarray(offset_px)
    imgs = rotate_images(torch.from_numpy(views[labels]), torch.from_numpy(psi).float())
    grid = FourierGrid.create(box)
    coeffs = grid.forward(imgs) * grid.shift_phase(torch.from_numpy(shifts).float(), -1.0)
    params = None
    if ctf:
        du = rng.uniform(10000, 25000, n)
        params = CTFParams(
            defocus_u_A=du,
            defocus_v_A=du - rng.uniform(0, 500, n),
            astigmatism_angle_deg=rng.uniform(0, 180, n),
            voltage_kV=np.full(n, 300.0),
            cs_mm=np.full(n, 2.7),
            amplitude_contrast=np.full(n, 0.1),
            phase_shift_deg=np.zeros(n),
            bfactor_A2=np.zeros(n),
        )
        cols = [torch.from_numpy(np.asarray(getattr(params, k), np.float32)) for k in CTF_COLUMNS]
        coeffs = coeffs * ctf_values(torch.stack(cols, 1), grid, pixel_size_A)
    clean = grid.inverse(coeffs).numpy()
    signal_var = clean.var(axis=(1, 2)).mean()
    noisy = clean + rng.normal(0, math.sqrt(signal_var / snr), clean.shape).astype(np.float32)
    ps = ParticleSet.from_array(noisy.astype(np.float32), pixel_size_A, ctf=params)
    return ps, labels, psi, shifts, views


def purity(labels: np.ndarray, classes: np.ndarray) -> float:
    """Particle-weighted purity of ``classes`` against true ``labels``."""
    total = 0
    for c in np.unique(classes):
        total += np.bincount(labels[classes == c]).max()
    return total / len(labels)
