"""A built-in, asymmetric 3D phantom: a sum of anisotropic Gaussian blobs.

The blobs are fixed (a hand-placed body, head, arm, foot and knob plus small
features placed from a fixed seed), so the phantom is the same on every
machine and needs no downloaded file. It has no symmetry, so every viewing
direction gives a different projection. Coordinates are in units of the
phantom radius, so it can be rendered at any box and pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: fixed seed of the small features: changing it changes the phantom
PHANTOM_SEED = 20240611


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass(frozen=True)
class Phantom:
    """Gaussian blobs in units of the phantom radius.

    Attributes
    ----------
    centers
        ``(n, 3)`` blob centres ``(x, y, z)``.
    covariances
        ``(n, 3, 3)`` blob covariance matrices.
    amplitudes
        ``(n,)`` peak densities.
    """

    centers: np.ndarray
    covariances: np.ndarray
    amplitudes: np.ndarray

    def render(self, box: int, pixel_size_A: float, radius_A: float) -> torch.Tensor:
        """The phantom sampled on a ``(D, D, D)`` grid ``[z, y, x]``, centre at ``D//2``.

        Parameters
        ----------
        box
            Edge length ``D`` in voxels.
        pixel_size_A
            Voxel size in Å.
        radius_A
            Physical radius of the phantom in Å (all blobs lie within it).
        """
        scale = radius_A / pixel_size_A  # voxels per unit
        r = torch.arange(box, dtype=torch.float32) - box // 2
        z, y, x = torch.meshgrid(r, r, r, indexing="ij")
        pts = torch.stack((x, y, z), dim=-1).reshape(-1, 3)
        vol = torch.zeros(pts.shape[0], dtype=torch.float32)
        for c, cov, a in zip(self.centers, self.covariances, self.amplitudes, strict=True):
            # exp(-0.5 |L^T d|^2) with prec = L L^T; skip points beyond 5 sigma of the blob
            L = np.linalg.cholesky(np.linalg.inv(cov * scale**2))
            reach = 5.0 * math.sqrt(float(np.linalg.eigvalsh(cov).max())) * scale
            d = pts - torch.as_tensor(c * scale, dtype=torch.float32)
            near = (d.abs() <= reach).all(dim=1)
            w = d[near] @ torch.as_tensor(L, dtype=torch.float32)
            vol[near] += float(a) * torch.exp(-0.5 * (w * w).sum(dim=1))
        return vol.reshape(box, box, box).float()

    def project(
        self, A: np.ndarray, box: int, pixel_size_A: float, radius_A: float
    ) -> torch.Tensor:
        """Exact (analytic) projections for RELION matrices ``A`` ``(N, 3, 3)``.

        ``P(x, y) = integral of V(A.T @ (x, y, z)) dz`` with ``dz`` in voxels, so
        the result matches projecting :meth:`render` along the same direction.
        A Gaussian projects to a Gaussian: mean ``(A c)[:2]``, covariance
        ``(A S A.T)[:2, :2]`` and weight ``sqrt(2 pi det(S) / det(S_2d))``.
        """
        A = np.asarray(A, dtype=np.float64).reshape(-1, 3, 3)
        scale = radius_A / pixel_size_A
        r = np.arange(box, dtype=np.float64) - box // 2
        y, x = np.meshgrid(r, r, indexing="ij")
        out = np.zeros((len(A), box, box))
        for c, cov, a in zip(self.centers, self.covariances, self.amplitudes, strict=True):
            S = cov * scale**2
            m = (A @ (c * scale))[:, :2]  # (N, 2) x, y
            C = A @ S @ A.transpose(0, 2, 1)
            C2 = C[:, :2, :2]
            det2 = np.linalg.det(C2)
            P = np.linalg.inv(C2)
            weight = a * np.sqrt(2 * math.pi * np.linalg.det(S) / det2)
            dx = x[None] - m[:, 0, None, None]
            dy = y[None] - m[:, 1, None, None]
            q = (
                P[:, 0, 0, None, None] * dx * dx
                + 2 * P[:, 0, 1, None, None] * dx * dy
                + P[:, 1, 1, None, None] * dy * dy
            )
            out += weight[:, None, None] * np.exp(-0.5 * q)
        return torch.as_tensor(out, dtype=torch.float32)


def default_phantom() -> Phantom:
    """The built-in asymmetric phantom (radius 1; every blob's 2-sigma extent inside it)."""
    rng = np.random.default_rng(PHANTOM_SEED)
    # hand-placed domains: centre (x, y, z), sigmas, amplitude
    domains = [
        ((0.00, -0.10, 0.00), (0.42, 0.20, 0.24), 1.0),  # elongated body
        ((0.36, 0.32, 0.10), (0.18, 0.17, 0.15), 1.2),  # head
        ((-0.40, 0.28, -0.18), (0.26, 0.07, 0.09), 1.1),  # thin arm
        ((0.12, -0.48, 0.30), (0.10, 0.13, 0.20), 0.9),  # foot
        ((-0.22, -0.30, -0.46), (0.09, 0.09, 0.09), 1.6),  # dense knob
        ((0.55, -0.05, -0.30), (0.08, 0.20, 0.08), 1.0),  # side rod
    ]
    centers, covs, amps = [], [], []
    for c, s, a in domains:
        Q = _random_rotation(rng)
        centers.append(c)
        covs.append(Q @ np.diag(np.square(s)) @ Q.T)
        amps.append(a)
    # small features on the surface, from the fixed seed
    n_small = 9
    while len(centers) < len(domains) + n_small:
        sig = rng.uniform(0.07, 0.12, size=3)
        c = rng.normal(size=3)
        c *= rng.uniform(0.35, 0.75) / np.linalg.norm(c)
        if np.linalg.norm(c) + 2 * sig.max() > 0.95:
            continue
        Q = _random_rotation(rng)
        centers.append(tuple(c))
        covs.append(Q @ np.diag(sig**2) @ Q.T)
        amps.append(rng.uniform(0.8, 1.6))
    return Phantom(np.array(centers), np.array(covs), np.array(amps))
