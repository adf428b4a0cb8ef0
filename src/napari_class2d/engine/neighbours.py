"""Neighbouring picks: where they lie in each particle's box, and masks that remove them.

In a crowded field (β-galactosidase on EMPIAR-10017: three quarters of the picks have
another pick closer than one particle diameter) a neighbour's edge lies inside the
circular particle mask. It is the strongest asymmetric feature of a roundish particle at
low resolution, so classes from scratch align on it: every member is turned until its
neighbour sits at the same place, and the class shows a crescent at the mask edge
instead of the particle's own shape ("Einstein from neighbours").

The pick coordinates say where the neighbours are. With ``mask_neighbours`` each particle
keeps the part of its box nearer its own pick than any other pick on the same micrograph
(its cell of the picks' Voronoi diagram), with a raised-cosine edge across each bisector.
Picks closer than :data:`SAME_PARTICLE_FRACTION` of the particle diameter are taken for
the same particle picked twice and not masked.

The masks are made at the pick when the particles are cached, or, with
``masks_follow_shifts``, when particles are read for an iteration, around each particle's
current centre (its pick moved by its current shift; :meth:`ParticlePool.get
<napari_class2d.engine.pool.ParticlePool.get>`), so that a particle the search moves keeps
its own density and its bisectors move with it. Only picks of the same particle set are
neighbours (a stream's later file with the same micrograph is not looked at).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from napari_class2d.io.particles import ParticleSet

#: picks nearer than this fraction of the particle diameter are one particle picked twice
SAME_PARTICLE_FRACTION = 0.3
#: most neighbours masked per particle (the nearest ones)
MAX_NEIGHBOURS = 8
#: a "micrograph" with more picks than this is not one (a file without real micrograph
#: names): its particles' neighbours are not masked
MAX_PICKS_PER_MICROGRAPH = 20000


def pick_positions_A(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray] | None:
    """Micrograph of each particle and its pick (x, y) on it in Å, from the metadata.

    RELION: ``rlnMicrographName`` with ``rlnCoordinateX/Y`` in micrograph pixels of
    ``rlnMicrographPixelSize`` (else ``rlnMicrographOriginalPixelSize``, else the image
    pixel size: particles extracted without binning). cryoSPARC: ``location/*`` (the
    fractional centre times the micrograph's shape and pixel size).

    Returns
    -------
    tuple or None
        ``(group, xy_A)``: ``(N,)`` int64 micrograph index and ``(N, 2)`` float64 Å;
        ``None`` when the source has no pick coordinates.
    """
    md = particles.metadata
    if {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= set(md.columns):
        xy = md[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64)
        apix = np.asarray(particles.pixel_size_A, np.float64).copy()
        optics = particles.optics
        if optics is not None and "rlnOpticsGroup" in optics.columns:
            groups = pd.Series(np.asarray(particles.optics_group, np.int64))
            by_group = optics.set_index(optics["rlnOpticsGroup"].astype(np.int64))
            for column in ("rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize"):
                if column in optics.columns:  # the later column wins
                    mapped = groups.map(by_group[column].astype(float)).to_numpy(np.float64)
                    apix = np.where(np.isnan(mapped), apix, mapped)
        names = md["rlnMicrographName"].astype(str).to_numpy()
        group = np.unique(names, return_inverse=True)[1]
        return group.astype(np.int64), xy * apix[:, None]
    cs = ("location/center_x_frac", "location/center_y_frac", "location/micrograph_psize_A")
    shape = ("location/micrograph_shape/0", "location/micrograph_shape/1")
    mic = next(
        (c for c in ("location/micrograph_uid", "location/micrograph_path") if c in md.columns),
        None,
    )
    if mic is not None and set(cs + shape) <= set(md.columns):
        psize = md["location/micrograph_psize_A"].to_numpy(np.float64)
        x = md["location/center_x_frac"].to_numpy(np.float64) * md[shape[1]].to_numpy(float)
        y = md["location/center_y_frac"].to_numpy(np.float64) * md[shape[0]].to_numpy(float)
        group = np.unique(md[mic].astype(str).to_numpy(), return_inverse=True)[1]
        return group.astype(np.int64), np.stack((x, y), 1) * psize[:, None]
    return None


def micrograph_groups(particles: ParticleSet) -> np.ndarray | None:
    """``(N,)`` int64 index of each particle's micrograph (RELION ``rlnMicrographName``;
    cryoSPARC ``location/micrograph_uid`` or ``location/micrograph_path``), or ``None``
    when the source names no micrograph."""
    md = particles.metadata
    column = next(
        (
            c
            for c in ("rlnMicrographName", "location/micrograph_uid", "location/micrograph_path")
            if c in md.columns
        ),
        None,
    )
    if column is None:
        return None
    return np.unique(md[column].astype(str).to_numpy(), return_inverse=True)[1].astype(np.int64)


def neighbour_offsets_A(
    group: np.ndarray, xy_A: np.ndarray, reach_A: float, same_A: float
) -> np.ndarray:
    """Offsets from each pick to its nearest other picks on the same micrograph.

    Parameters
    ----------
    group, xy_A
        From :func:`pick_positions_A`.
    reach_A
        Neighbours farther than this (Å) are left out.
    same_A
        Neighbours nearer than this (Å) are the same particle picked twice: left out.

    Returns
    -------
    np.ndarray
        ``(N, MAX_NEIGHBOURS, 2)`` float32 offsets (x, y) in Å, nearest first; NaN where
        a particle has fewer neighbours.
    """
    n = len(group)
    out = np.full((n, MAX_NEIGHBOURS, 2), np.nan, np.float32)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    xy = torch.from_numpy(np.asarray(xy_A, np.float64))
    skipped = 0
    for members in np.split(order, bounds):  # one micrograph at a time, rows in chunks
        if len(members) > MAX_PICKS_PER_MICROGRAPH:
            skipped += len(members)
            continue
        pos = xy[members]
        rows_per_chunk = max(1, min(1024, 2**22 // len(members)))
        for s in range(0, len(members), rows_per_chunk):
            rows = members[s : s + rows_per_chunk]
            d = pos[None, :, :] - pos[s : s + rows_per_chunk, None, :]  # (b, m, 2): to others
            dist = torch.linalg.vector_norm(d, dim=-1)
            dist = dist.masked_fill((dist < same_A) | (dist > reach_A), math.inf)
            k = min(MAX_NEIGHBOURS, dist.shape[1])
            near, at = torch.topk(dist, k, dim=1, largest=False)
            off = torch.gather(d, 1, at[..., None].expand(-1, -1, 2))
            off = off.masked_fill(~torch.isfinite(near)[..., None], math.nan)
            out[rows, :k] = off.float().numpy()
    if skipped:
        warnings.warn(
            f"{skipped} particles share micrographs of more than {MAX_PICKS_PER_MICROGRAPH} "
            "picks each: their micrograph names are not real ones, so their neighbours "
            "are not masked",
            stacklevel=2,
        )
    return out


def neighbour_masks(
    offsets_px: torch.Tensor, box: int, edge_px: float, centres_px: torch.Tensor | None = None
) -> torch.Tensor:
    """Masks that keep each particle's side of the bisectors with its neighbours.

    Parameters
    ----------
    offsets_px
        ``(B, M, 2)`` neighbour offsets (x, y) in pixels of the image (NaN: none).
    box
        Image edge length in pixels; the particle's pick is at pixel ``box // 2``.
    edge_px
        Width of the raised-cosine edge across each bisector, pixels.
    centres_px
        ``(B, 2)`` where each particle's centre is (x, y), pixels from the pick; the
        bisectors are those between that centre and the neighbours (default: the pick).

    Returns
    -------
    torch.Tensor
        ``(B, box, box)`` float32 in [0, 1].
    """
    c = torch.arange(box, dtype=torch.float32, device=offsets_px.device) - box // 2
    py, px = torch.meshgrid(c, c, indexing="ij")
    masks = torch.ones((offsets_px.shape[0], box, box), device=offsets_px.device)
    if centres_px is not None:  # pixel positions and neighbours relative to the centre
        cx = centres_px[:, 0, None, None].to(px)
        cy = centres_px[:, 1, None, None].to(px)
        px, py = px - cx, py - cy
        offsets_px = offsets_px - centres_px[:, None, :].to(offsets_px)
    half = 0.5 * max(edge_px, 1.0)
    for j in range(offsets_px.shape[1]):  # a few neighbour slots, each batched over particles
        d = offsets_px[:, j]
        length = torch.linalg.vector_norm(d, dim=1).nan_to_num(math.inf)
        u = d / length.clamp(min=1e-6)[:, None]
        # signed distance past the bisector, toward the neighbour
        s = px * u[:, 0, None, None] + py * u[:, 1, None, None] - 0.5 * length[:, None, None]
        t = ((s + half) / (2 * half)).clamp(0.0, 1.0).nan_to_num(0.0)
        masks = masks * (0.5 + 0.5 * torch.cos(math.pi * t))
    return masks
