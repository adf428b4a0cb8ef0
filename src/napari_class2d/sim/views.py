"""Choice of distinct view directions and of the view populations of a simulated data set."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_fourier_rescale import fourier_rescale_3d

from napari_class2d.sim.filters import bandpass
from napari_class2d.sim.project import FourierProjector
from napari_class2d.sim.transforms import fourier_upsample, rotate_upsampled, soft_disk


def fibonacci_directions(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` near-uniform directions on the sphere, randomly rotated: ``(rot, tilt)`` degrees."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * i
    v = np.stack((np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z), -1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    v = v @ q.T
    tilt = np.rad2deg(np.arccos(np.clip(v[:, 2], -1, 1)))
    rot = np.rad2deg(np.arctan2(v[:, 1], v[:, 0]))
    return rot, tilt


def _normalised_features(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = images * mask
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    x = x.reshape(x.shape[0], -1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def choose_view_directions(
    volume: torch.Tensor,
    n_views: int,
    rng: np.random.Generator,
    pixel_size_A: float,
    diameter_A: float,
    n_candidates: int = 300,
    compare_res_A: float = 12.0,
    rotation_step_deg: float = 5.0,
) -> dict:
    """Pick ``n_views`` directions whose projections differ the most (greedy farthest-point).

    Candidates are near-uniform directions on the whole sphere. Two directions
    are similar when their projections, band-passed to ``4 compare_res_A`` -
    ``compare_res_A`` and masked to the particle, correlate after the best in-plane rotation (no
    mirroring: 2D classes are never mirrored). Starting from a random
    candidate, each next view is the candidate least similar to the ones
    already chosen, so symmetric maps never yield two views that are the same
    image.

    Returns
    -------
    dict
        ``rot_deg``, ``tilt_deg`` (``(n_views,)``) and ``max_similarity``: for
        each view, its highest rotation-maximised correlation with another view.
    """
    box = volume.shape[-1]
    # compare at low resolution: a small box is enough and fast
    small = int(min(box, max(16, 2 * math.ceil(box * pixel_size_A / compare_res_A))))
    small += small % 2
    vol = volume
    if small < box:
        vol, _ = fourier_rescale_3d(volume, target_shape=(small, small, small))
    apix_small = pixel_size_A * box / small
    rot, tilt = fibonacci_directions(n_candidates, rng)
    proj = FourierProjector(vol).project(rot, tilt, 0.0)
    # the overall particle outline correlates every pair of views; compare the features
    proj = bandpass(proj, apix_small, low_res_A=4 * compare_res_A, high_res_A=compare_res_A)
    mask = soft_disk(small, 0.5 * diameter_A / apix_small, edge_px=2.0)
    feats = _normalised_features(proj, mask)  # (C, P)
    up = fourier_upsample(proj, 2)
    angles = torch.arange(0.0, 360.0, rotation_step_deg)

    def similarity_to(index: int) -> torch.Tensor:
        rotated = rotate_upsampled(up, angles, small, index=torch.full((len(angles),), index))
        rf = _normalised_features(rotated, mask)  # (R, P)
        return (rf @ feats.T).max(dim=0).values  # (C,)

    first = int(rng.integers(n_candidates))
    chosen = [first]
    max_sim = similarity_to(first)
    sims = [max_sim.clone()]
    for _ in range(1, n_views):
        score = max_sim.clone()
        score[chosen] = float("inf")
        nxt = int(torch.argmin(score))
        chosen.append(nxt)
        s = similarity_to(nxt)
        sims.append(s)
        max_sim = torch.maximum(max_sim, s)
    S = torch.stack(sims)[:, chosen]  # (V, V)
    S.fill_diagonal_(-1.0)
    return {
        "rot_deg": rot[chosen],
        "tilt_deg": tilt[chosen],
        "max_similarity": S.max(dim=1).values.numpy() if n_views > 1 else np.zeros(1),
    }


def view_populations(
    n_views: int, rare_views: int, rare_fraction: float, junk_fraction: float
) -> tuple[np.ndarray, list[str]]:
    """Fraction of all particles in each view, and each view's kind.

    The ``n_views - rare_views`` common views share what is left after junk and
    rare views: the first quarter (at least one) are ``"dominant"`` with 2.5x
    the weight of the others (``"medium"``); each rare view holds
    ``rare_fraction``. The order of kinds is ``dominant..., medium..., rare...``.
    """
    if not 0 <= rare_views <= n_views:
        raise ValueError(f"rare_views={rare_views}: must be between 0 and n_views={n_views}")
    common = n_views - rare_views
    rest = 1.0 - junk_fraction - rare_views * rare_fraction
    if rest <= 0 or (common == 0 and rest > 1e-9):
        raise ValueError(
            f"junk_fraction={junk_fraction} and {rare_views} rare views x {rare_fraction} leave "
            f"{rest:.3f} of the particles for {common} common views"
        )
    n_dom = max(1, round(common / 4)) if common else 0
    weights = np.array([2.5] * n_dom + [1.0] * (common - n_dom))
    fractions = np.concatenate(
        [rest * weights / weights.sum(), np.full(rare_views, rare_fraction)]
    )
    kinds = ["dominant"] * n_dom + ["medium"] * (common - n_dom) + ["rare"] * rare_views
    return fractions, kinds


def exact_counts(n: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * fractions`` (largest remainder)."""
    raw = n * np.asarray(fractions, dtype=np.float64)
    counts = np.floor(raw).astype(np.int64)
    short = n - counts.sum()
    if short > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts
