"""Junk images (labelled as such in the truth): empty boxes, blobs, aggregates, carbon edges.

All kinds are clean signals before CTF and noise, on the same intensity scale
as the particle projections, so the simulator treats them like particles.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_class2d.sim.transforms import rotate_upsampled, shift_padded

#: junk kinds and their share of the junk particles
JUNK_KINDS: dict[str, float] = {"noise": 0.25, "blob": 0.30, "aggregate": 0.30, "edge": 0.15}


def _grid(box: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(box, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    return x, y


def blobs(n: int, rng: np.random.Generator, box: int, diameter_px: float, peak: float):
    """``n`` images of 1-4 random 2D Gaussian blobs inside the particle area."""
    k = 4
    count = rng.integers(1, k + 1, size=n)
    present = np.arange(k)[None, :] < count[:, None]
    radius = 0.5 * diameter_px
    pos = rng.uniform(-0.7, 0.7, size=(n, k, 2)) * radius
    sx = rng.uniform(0.06, 0.3, size=(n, k)) * diameter_px
    sy = sx * rng.uniform(0.4, 1.0, size=(n, k))
    theta = rng.uniform(0, np.pi, size=(n, k))
    amp = rng.uniform(0.3, 1.2, size=(n, k)) * peak * present
    x, y = _grid(box)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[..., None, None]  # noqa: E731
    dx, dy = x - t(pos[..., 0]), y - t(pos[..., 1])
    c, s = torch.cos(t(theta)), torch.sin(t(theta))
    u, v = c * dx + s * dy, -s * dx + c * dy
    img = t(amp) * torch.exp(-0.5 * ((u / t(sx)) ** 2 + (v / t(sy)) ** 2))
    return img.sum(1)


def aggregates(
    n: int, rng: np.random.Generator, bank_up: torch.Tensor, box: int, diameter_px: float
) -> torch.Tensor:
    """``n`` images of 2-4 overlapping copies of random projections (clumped particles)."""
    copies = rng.integers(2, 5, size=n)
    owner = np.repeat(np.arange(n), copies)
    m = len(owner)
    which = rng.integers(len(bank_up), size=m)
    psi = rng.uniform(-180, 180, size=m)
    # the first copy near the centre, the others 0.3-0.7 diameters away from it
    dist = rng.uniform(0.3, 0.7, size=m) * diameter_px
    first = np.r_[True, owner[1:] != owner[:-1]]
    dist[first] = rng.uniform(0, 0.15, size=first.sum()) * diameter_px
    phi = rng.uniform(0, 2 * np.pi, size=m)
    shifts = np.stack((dist * np.cos(phi), dist * np.sin(phi)), -1)
    imgs = rotate_upsampled(bank_up, torch.as_tensor(psi), box, index=torch.as_tensor(which))
    imgs = shift_padded(imgs, torch.as_tensor(shifts, dtype=torch.float32))
    out = torch.zeros((n, box, box))
    out.index_add_(0, torch.as_tensor(owner), imgs)
    return out


def edges(n: int, rng: np.random.Generator, box: int, peak: float) -> torch.Tensor:
    """``n`` images of a smooth step (a carbon or ice edge) crossing the box."""
    x, y = _grid(box)
    phi = torch.as_tensor(rng.uniform(0, 2 * np.pi, size=n), dtype=torch.float32)[:, None, None]
    off = torch.as_tensor(rng.uniform(-0.3, 0.3, size=n) * box, dtype=torch.float32)[:, None, None]
    width = torch.as_tensor(rng.uniform(1.0, 4.0, size=n), dtype=torch.float32)[:, None, None]
    amp = torch.as_tensor(rng.uniform(0.2, 0.6, size=n) * peak, dtype=torch.float32)[:, None, None]
    d = torch.cos(phi) * x + torch.sin(phi) * y - off
    return amp * torch.sigmoid(d / width)


def make_junk(
    kinds: np.ndarray,
    rng: np.random.Generator,
    box: int,
    bank_up: torch.Tensor,
    diameter_px: float,
    peak: float,
) -> torch.Tensor:
    """Clean junk signals ``(n, D, D)`` for an array of kind names (see :data:`JUNK_KINDS`)."""
    kinds = np.asarray(kinds)
    out = torch.zeros((len(kinds), box, box))
    for kind in JUNK_KINDS:
        where = np.nonzero(kinds == kind)[0]
        if not len(where):
            continue
        n = len(where)
        if kind == "blob":
            imgs = blobs(n, rng, box, diameter_px, peak)
        elif kind == "aggregate":
            imgs = aggregates(n, rng, bank_up, box, diameter_px)
        elif kind == "edge":
            imgs = edges(n, rng, box, peak)
        else:
            continue  # "noise": an empty box
        out[torch.as_tensor(where)] = imgs
    unknown = set(np.unique(kinds)) - set(JUNK_KINDS)
    if unknown:
        raise ValueError(f"unknown junk kind(s): {sorted(unknown)}")
    return out
