"""Score a 2D classification of a simulated data set against its ground truth.

The rule (also in ``docs/simulation.md``): view ``v`` (``n_v`` particles) is
**recovered** when some class ``c`` satisfies all of

1. purity: at least ``min_purity`` (60 %) of the particles in ``c`` are from ``v``;
2. a meaningful share of the view: ``c`` holds at least
   ``max(min_particles, ceil(min_view_share * n_v))`` particles of ``v``
   (10 particles and 10 % of the view by default);
3. its average matches the view: after the best in-plane rotation (2° steps,
   no mirror: 2D classes are never mirrored) and shift (FFT cross-correlation),
   found on images band-passed to 40-8 Å, the Fourier ring correlation of the
   class average with the view's clean projection (both under the same soft
   circular mask of the particle diameter + 10 %) stays >= 0.5 down to
   ``max_resolution_A`` (25 Å) or finer.

Truth projections are Fourier-resampled to the class-average pixel size.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch
from torch_fourier_rescale import fourier_rescale_2d
from torch_fourier_shell_correlation import fourier_ring_correlation

from napari_class2d.sim.filters import bandpass
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import (
    fourier_upsample,
    rotate_and_shift,
    rotate_upsampled,
    soft_disk,
)


class ScoreInputError(ValueError):
    """Inputs that cannot be scored; the message names the file and what is wrong."""


def _image_key(names: pd.Series) -> np.ndarray:
    """``index@stackname`` (1-based index, stack file name without folders) of each image."""
    parts = names.astype(str).str.split("@", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        raise ScoreInputError("rlnImageName entries must look like 'N@stack.mrcs'")
    index = parts[0].astype(int).astype(str)
    stack = parts[1].str.replace("\\", "/", regex=False).str.rsplit("/", n=1).str[-1]
    return (index + "@" + stack).to_numpy()


def _particles_block(path: Path) -> pd.DataFrame:
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises many kinds
        raise ScoreInputError(f"{path}: not a readable STAR file ({err})") from None
    if "particles" in blocks and isinstance(blocks["particles"], pd.DataFrame):
        return blocks["particles"]
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and "rlnClassNumber" in block:
            return block
    raise ScoreInputError(f"{path}: no particle table with rlnClassNumber")


def frc_resolution(frc: torch.Tensor, box: int, pixel_size_A: float, threshold: float = 0.5):
    """Resolution in Å where a Fourier ring correlation first drops below ``threshold``.

    ``frc`` is ``(..., box//2 + 1)`` with ring ``i`` at ``i / box`` cycles/pixel;
    ring 0 (the mean) is ignored. Linear interpolation between rings; Nyquist
    (``2 * pixel_size_A``) when it never drops, the box size when ring 1 fails.
    """
    frc = frc.detach().cpu().numpy().astype(np.float64)
    flat = frc.reshape(-1, frc.shape[-1])
    out = np.empty(len(flat))
    for k, row in enumerate(flat):  # rows are classes x views, not particles
        below = np.nonzero(row[1:] < threshold)[0]
        if not len(below):
            out[k] = 2.0 * pixel_size_A
            continue
        i = int(below[0]) + 1
        if i == 1:
            out[k] = box * pixel_size_A
            continue
        a, b = row[i - 1], row[i]
        frac = (a - threshold) / (a - b) if a != b else 0.0
        f = (i - 1 + frac) / box
        out[k] = pixel_size_A / f
    return out.reshape(frc.shape[:-1])


def _resample_views(views: torch.Tensor, apix: float, class_box: int, class_apix: float):
    """Truth projections at the class pixel size, in a ``class_box`` box."""
    box = views.shape[-1]
    if abs(box * apix - class_box * class_apix) <= 0.5 * class_apix:
        if box == class_box:
            return views
        out, _ = fourier_rescale_2d(views, target_shape=(class_box, class_box))
        return out
    out, _ = fourier_rescale_2d(views, source_spacing=apix, target_spacing=class_apix)
    n = out.shape[-1]
    if n >= class_box:
        s = n // 2 - class_box // 2
        return out[..., s : s + class_box, s : s + class_box]
    pad = torch.zeros(out.shape[:-2] + (class_box, class_box))
    d = class_box // 2 - n // 2
    pad[..., d : d + n, d : d + n] = out
    return pad


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]


def _subpixel_peak(cc: torch.Tensor, allowed: torch.Tensor):
    """Peak of ``(..., D, D)`` cross-correlation maps, refined by parabolas along x and y.

    Returns the interpolated peak height and the peak position ``(x, y)`` in
    signed pixels (FFT index order: index ``i`` is shift ``i`` or ``i - D``).
    """
    box = cc.shape[-1]
    lead = cc.shape[:-2]
    m = cc.masked_fill(~allowed, -2.0).reshape(-1, box, box)
    best, where = m.flatten(1).max(dim=1)
    iy, ix = where // box, where % box
    k = torch.arange(m.shape[0])

    def vertex(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
        den = a - 2 * b + c
        ok = den < -1e-12
        off = torch.where(ok, 0.5 * (a - c) / torch.where(ok, den, -1.0), 0.0).clamp(-0.5, 0.5)
        gain = torch.where(ok, -0.125 * (a - c) ** 2 / torch.where(ok, den, -1.0), 0.0)
        return off, gain

    dx, gx = vertex(m[k, iy, (ix - 1) % box], best, m[k, iy, (ix + 1) % box])
    dy, gy = vertex(m[k, (iy - 1) % box, ix], best, m[k, (iy + 1) % box, ix])
    r = torch.fft.fftfreq(box) * box
    height = (best + gx + gy).reshape(lead)
    return height, (r[ix] + dx).reshape(lead), (r[iy] + dy).reshape(lead)


def align_to_views(
    classes: torch.Tensor,
    views: torch.Tensor,
    pixel_size_A: float,
    mask: torch.Tensor,
    band_A: tuple[float, float] = (40.0, 8.0),
    rotation_step_deg: float = 2.0,
    max_shift_px: float | None = None,
    refine_steps: int = 4,
) -> dict:
    """Best rotation and shift taking each view's projection onto each class average.

    For class ``c`` and view ``v`` finds ``psi, s`` maximising the correlation of
    ``class_c`` with ``rotate_and_shift(view_v, psi, s)`` (band-passed, masked),
    i.e. ``class_c(x) ~ view_v(R(psi)(x - s))``. No mirroring. A coarse pass
    tries every ``rotation_step_deg`` with all shifts (FFT cross-correlation);
    a refinement then tries ``2 refine_steps + 1`` angles spanning one coarse
    step either side of the best, scoring each by its sub-pixel peak height.

    Returns
    -------
    dict
        ``score`` (K, V) normalised cross-correlation, ``psi_deg`` (K, V),
        ``shift_A`` (K, V, 2) as ``(x, y)``.
    """
    K, box = classes.shape[0], classes.shape[-1]
    V = views.shape[0]
    hi = max(band_A[1], 2.2 * pixel_size_A)
    lo = band_A[0] if band_A[0] < box * pixel_size_A else None

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(
            _normalise(bandpass(x * mask, pixel_size_A, lo, hi) * mask), dim=(-2, -1)
        )

    if max_shift_px is None:
        max_shift_px = 0.25 * box
    r = torch.fft.fftfreq(box) * box  # signed shift of each FFT index
    allowed = (r[:, None] ** 2 + r[None, :] ** 2) <= max_shift_px**2
    F_cls = prepare(classes)  # (K, D, D//2+1)
    up = fourier_upsample(views, 2)

    # coarse: every angle, integer shifts
    angles = torch.arange(0.0, 360.0, rotation_step_deg)
    R = len(angles)
    coarse = torch.zeros((K, V), dtype=torch.long)
    for v in range(V):  # a handful of views, each all rotations x all classes at once
        F_rot = prepare(rotate_upsampled(up, angles, box, index=torch.full((R,), v)))
        for c0 in range(0, K, 16):
            cc = torch.fft.irfftn(
                F_cls[c0 : c0 + 16, None] * F_rot[None].conj(), dim=(-2, -1), s=(box, box)
            )  # (k, R, D, D): cc[s] = sum_x cls(x) rot(x - s)
            cc = cc.masked_fill(~allowed, -2.0)
            coarse[c0 : c0 + 16, v] = cc.flatten(2).max(dim=2).values.argmax(dim=1)

    # refine: angles around the coarse best of each (class, view), sub-pixel peak heights
    offsets = torch.linspace(-rotation_step_deg, rotation_step_deg, 2 * refine_steps + 1)
    J = len(offsets)
    score = torch.empty(K * V)
    psi = torch.empty(K * V)
    shift = torch.empty(K * V, 2)
    pair_c = torch.arange(K).repeat_interleave(V)
    pair_v = torch.arange(V).repeat(K)
    base = angles[coarse.reshape(-1)]
    for p0 in range(0, K * V, 64):
        pc, pv = pair_c[p0 : p0 + 64], pair_v[p0 : p0 + 64]
        n = len(pc)
        ang = (base[p0 : p0 + 64, None] + offsets[None]).reshape(-1)
        F_rot = prepare(rotate_upsampled(up, ang, box, index=pv.repeat_interleave(J)))
        F_rot = F_rot.reshape(n, J, box, box // 2 + 1)
        cc = torch.fft.irfftn(F_cls[pc][:, None] * F_rot.conj(), dim=(-2, -1), s=(box, box))
        height, sx, sy = _subpixel_peak(cc, allowed)  # (n, J)
        best, j = height.max(dim=1)
        k = torch.arange(n)
        score[p0 : p0 + n] = best
        psi[p0 : p0 + n] = ang.reshape(n, J)[k, j] % 360.0
        shift[p0 : p0 + n, 0] = sx[k, j] * pixel_size_A
        shift[p0 : p0 + n, 1] = sy[k, j] * pixel_size_A
    return {
        "score": score.reshape(K, V),
        "psi_deg": psi.reshape(K, V),
        "shift_A": shift.reshape(K, V, 2),
    }


def score_classification(
    truth_dir: str | Path,
    data_star: str | Path,
    classes_mrcs: str | Path,
    pixel_size_A: float | None = None,
    *,
    min_purity: float = 0.6,
    min_view_share: float = 0.1,
    min_particles: int = 10,
    max_resolution_A: float = 25.0,
    band_A: tuple[float, float] = (40.0, 8.0),
    rotation_step_deg: float = 2.0,
) -> dict:
    """Compare a classification with the simulation truth (rule in the module docstring).

    Parameters
    ----------
    truth_dir
        Folder written by :func:`napari_class2d.sim.simulate.simulate_dataset`.
    data_star
        Classification result (``run_data.star``): ``rlnImageName`` and
        ``rlnClassNumber`` (1-based); ``rlnAnglePsi`` and ``rlnOriginX/YAngst``
        are used for the pose errors when present.
    classes_mrcs
        ``(K, D', D')`` class averages; class ``k`` is image ``k - 1``.
    pixel_size_A
        Pixel size of the class averages in Å (default: the file's voxel size,
        else the particles' box in Å divided by ``D'``).

    Returns
    -------
    dict
        ``n_views``, ``views_recovered``, ``n_rare_views``, ``rare_views_recovered``,
        ``purity`` (particle-weighted class purity, junk one label),
        ``junk_in_recovered_classes`` (fraction of junk particles in classes
        that recover a view), ``non_aggregate_junk_in_recovered_classes`` (the same for
        the junk that is not an aggregate: empty boxes, blobs, edges), ``junk_by_kind``
        (per junk kind: its count and the fraction in those classes),
        ``junk_share_of_recovered_classes`` (fraction of the
        particles in those classes that are junk: the contamination of a selection
        of the recovered classes), ``median_class_resolution_A`` (recovered
        classes, FRC 0.5 against the truth), ``pose_error`` (particles of
        recovered classes), ``per_view`` and ``per_class`` details and ``rule``.
    """
    with torch_threads(1):
        return _score(
            Path(truth_dir),
            Path(data_star),
            Path(classes_mrcs),
            pixel_size_A,
            min_purity,
            min_view_share,
            min_particles,
            max_resolution_A,
            band_A,
            rotation_step_deg,
        )


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


def _score(
    truth_dir: Path,
    data_star: Path,
    classes_mrcs: Path,
    pixel_size_A: float | None,
    min_purity: float,
    min_view_share: float,
    min_particles: int,
    max_resolution_A: float,
    band_A: tuple[float, float],
    rotation_step_deg: float,
) -> dict:
    info_path = truth_dir / "truth.json"
    if not info_path.is_file():
        raise ScoreInputError(f"{truth_dir}: no truth.json (not a simulation output folder)")
    info = json.loads(info_path.read_text())
    truth = starfile.read(truth_dir / "truth.star", always_dict=True)
    truth = next(iter(truth.values()))
    views_np = mrcfile.read(truth_dir / "truth_views.mrcs").astype(np.float32)
    if views_np.ndim == 2:
        views_np = views_np[None]
    V = views_np.shape[0]
    apix = float(info["pixel_size_A"])
    box = int(info["box"])
    diameter_A = float(info["particle_diameter_A"])
    rare = set(info.get("rare_views", []))
    kinds = {v["view"]: v["kind"] for v in info["views"]}

    data = _particles_block(data_star)
    for col in ("rlnImageName", "rlnClassNumber"):
        if col not in data:
            raise ScoreInputError(f"{data_star}: column {col} missing")
    truth_key = _image_key(truth["rlnImageName"])
    if len(set(truth_key)) != len(truth_key):
        raise ScoreInputError(f"{truth_dir / 'truth.star'}: image names are not unique")
    lookup = pd.Series(np.arange(len(truth_key)), index=truth_key)
    data_key = _image_key(data["rlnImageName"])
    missing = ~pd.Index(data_key).isin(lookup.index)
    if missing.any():
        row = int(np.argmax(missing))
        raise ScoreInputError(
            f"{data_star}: row {row + 1}: image {data['rlnImageName'].iloc[row]} is not in the "
            f"simulation {truth_dir}"
        )
    t_idx = lookup.loc[data_key].to_numpy()
    label = truth["sim_view"].to_numpy()[t_idx].astype(np.int64)
    junk_kind = (
        truth["sim_junk_kind"].to_numpy()[t_idx]
        if "sim_junk_kind" in truth
        else np.where(label < 0, "junk", "none")
    )
    label = np.where(label < 0, V, label)  # junk is label V

    with mrcfile.open(classes_mrcs, permissive=True) as mrc:
        classes_np = np.asarray(mrc.data, dtype=np.float32).copy()
        header_apix = float(mrc.voxel_size.x)
    if classes_np.ndim == 2:
        classes_np = classes_np[None]
    K, cbox = classes_np.shape[0], classes_np.shape[-1]
    class_apix = pixel_size_A or (header_apix if header_apix > 0 else box * apix / cbox)

    cls_num = data["rlnClassNumber"].to_numpy()
    bad = (cls_num < 1) | (cls_num > K) | (cls_num != np.round(cls_num))
    if bad.any():
        row = int(np.argmax(bad))
        raise ScoreInputError(
            f"{data_star}: row {row + 1}: rlnClassNumber {cls_num[row]} is not in 1..{K} "
            f"({classes_mrcs} holds {K} classes)"
        )
    c_of = cls_num.astype(np.int64) - 1
    counts = np.zeros((K, V + 1), dtype=np.int64)
    np.add.at(counts, (c_of, label), 1)
    n_class = counts.sum(1)
    n_view = np.bincount(label, minlength=V + 1)
    n = len(label)
    purity = float(counts.max(1).sum() / n) if n else float("nan")

    # -- match every class average with every view ---------------------------------
    classes = torch.as_tensor(classes_np)
    views = _resample_views(torch.as_tensor(views_np), apix, cbox, class_apix)
    radius_px = min(0.5 * 1.1 * diameter_A / class_apix, 0.5 * cbox - 2)
    mask = soft_disk(cbox, radius_px - 2.0, edge_px=4.0)
    align = align_to_views(classes, views, class_apix, mask, band_A, rotation_step_deg)
    psi, shift = align["psi_deg"], align["shift_A"]
    # put every view in its best pose on every class, then FRC under the mask
    posed = rotate_and_shift(
        views[None].expand(K, V, cbox, cbox).reshape(K * V, cbox, cbox),
        psi.reshape(-1),
        shift.reshape(-1, 2),
        class_apix,
    ).reshape(K, V, cbox, cbox)
    frc = fourier_ring_correlation(classes[:, None] * mask, posed * mask)
    res = frc_resolution(frc, cbox, class_apix)  # (K, V)
    res[n_class == 0] = np.inf

    share = np.maximum(min_particles, np.ceil(min_view_share * n_view[:V]))
    with np.errstate(invalid="ignore", divide="ignore"):
        class_purity_for = counts[:, :V] / np.maximum(n_class, 1)[:, None]
    candidate = (class_purity_for >= min_purity) & (counts[:, :V] >= share[None, :])
    passes = candidate & (res <= max_resolution_A)

    per_view, recovered_class_of = [], {}
    for v in range(V):
        ok = np.nonzero(passes[:, v])[0]
        cand = np.nonzero(candidate[:, v])[0]
        pick = ok if len(ok) else cand
        c = int(pick[np.argmin(res[pick, v])]) if len(pick) else None
        if len(ok):
            recovered_class_of[v] = ok.tolist()
        best = int(np.argmin(res[:, v]))
        per_view.append(
            {
                "view": v,
                "kind": kinds.get(v, ""),
                "n_particles": int(n_view[v]),
                "recovered": bool(len(ok)),
                "class": None if c is None else c + 1,
                "classes_recovering": [int(k) + 1 for k in ok],
                "class_n_particles": None if c is None else int(n_class[c]),
                "class_n_from_view": None if c is None else int(counts[c, v]),
                "class_purity": None if c is None else float(class_purity_for[c, v]),
                "resolution_A": None if c is None else float(res[c, v]),
                "align_psi_deg": None if c is None else float(psi[c, v]),
                "align_shift_A": None if c is None else [float(x) for x in shift[c, v]],
                "best_matching_class": best + 1,
                "best_matching_resolution_A": float(res[best, v]),
                "best_matching_class_purity": float(class_purity_for[best, v]),
                "best_matching_psi_deg": float(psi[best, v]),
                "best_matching_shift_A": [float(x) for x in shift[best, v]],
            }
        )
    rec_classes = sorted({k for ks in recovered_class_of.values() for k in ks})
    n_junk = int(n_view[V])
    junk_in_rec = float(counts[rec_classes, V].sum() / n_junk) if n_junk else 0.0
    n_in_rec = int(n_class[rec_classes].sum())
    junk_share = float(counts[rec_classes, V].sum() / n_in_rec) if n_in_rec else 0.0
    rec_res = [float(res[k, v]) for v, ks in recovered_class_of.items() for k in ks]
    in_rec = np.isin(c_of, rec_classes)
    junk_by_kind = {
        str(kind): {
            "n": int((junk_kind == kind).sum()),
            "in_recovered_classes": float(in_rec[junk_kind == kind].mean()),
        }
        for kind in sorted(set(junk_kind[label == V].tolist()))
    }
    not_aggregate = (label == V) & (junk_kind != "aggregate")
    junk_no_agg = float(in_rec[not_aggregate].mean()) if not_aggregate.any() else 0.0

    per_class = []
    for k in range(K):
        top = int(np.argmax(counts[k])) if n_class[k] else None
        per_class.append(
            {
                "class": k + 1,
                "n_particles": int(n_class[k]),
                "majority_label": None if top is None else ("junk" if top == V else top),
                "majority_fraction": None if top is None else float(counts[k, top] / n_class[k]),
                "junk_fraction": float(counts[k, V] / n_class[k]) if n_class[k] else None,
                "recovers_views": [v for v, ks in recovered_class_of.items() if k in ks],
                "best_view": int(np.argmin(res[k])) if n_class[k] else None,
                "best_view_resolution_A": float(res[k].min()) if n_class[k] else None,
            }
        )

    pose = _pose_errors(data, truth, t_idx, c_of, label, recovered_class_of, psi, shift, apix)
    return {
        "n_particles": int(n),
        "n_classes": int(K),
        "n_nonempty_classes": int((n_class > 0).sum()),
        "n_views": int(V),
        "views_recovered": int(len(recovered_class_of)),
        "n_rare_views": len(rare),
        "rare_views_recovered": int(sum(v in recovered_class_of for v in rare)),
        "purity": purity,
        "n_junk": n_junk,
        "junk_in_recovered_classes": junk_in_rec,
        "junk_share_of_recovered_classes": junk_share,
        "non_aggregate_junk_in_recovered_classes": junk_no_agg,
        "junk_by_kind": junk_by_kind,
        "median_class_resolution_A": float(np.median(rec_res)) if rec_res else None,
        "class_pixel_size_A": float(class_apix),
        "pose_error": pose,
        "per_view": per_view,
        "per_class": per_class,
        "rule": {
            "min_purity": min_purity,
            "min_particles": min_particles,
            "min_view_share": min_view_share,
            "max_resolution_A": max_resolution_A,
            "align_band_A": list(band_A),
            "rotation_step_deg": rotation_step_deg,
            "mirror": False,
            "frc_threshold": 0.5,
            "mask_diameter_A": 2 * radius_px * class_apix,
        },
    }


def _pose_errors(
    data, truth, t_idx, c_of, label, recovered_class_of, psi, shift, particle_apix
) -> dict | None:
    """In-plane angle and shift errors of the particles of recovered classes.

    With ``class ~ rotate_and_shift(view, phi, s)`` (from the alignment) and a
    particle reported as ``rotate_and_shift(class, psi_e, t_e)`` (``t_e`` =
    minus the RELION origin), the implied truth is ``psi = phi + psi_e`` and
    ``t = t_e + R(-psi_e) s``.
    """
    cols = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
    if not all(c in data for c in cols) or not recovered_class_of:
        return None
    sel = np.zeros(len(label), dtype=bool)
    view_of = np.full(len(label), -1)
    for v, ks in recovered_class_of.items():
        m = (label == v) & np.isin(c_of, ks)
        sel |= m
        view_of[m] = v
    if not sel.any():
        return None
    k, v = c_of[sel], view_of[sel]
    phi = psi.numpy()[k, v]
    s = shift.numpy()[k, v]  # (n, 2)
    psi_e = data["rlnAnglePsi"].to_numpy(dtype=np.float64)[sel]
    t_e = -np.stack(
        [
            data["rlnOriginXAngst"].to_numpy(np.float64),
            data["rlnOriginYAngst"].to_numpy(np.float64),
        ],
        -1,
    )[sel]
    a = np.deg2rad(-psi_e)
    rs = np.stack(
        (np.cos(a) * s[:, 0] - np.sin(a) * s[:, 1], np.sin(a) * s[:, 0] + np.cos(a) * s[:, 1]), -1
    )
    true_psi = truth["sim_psi_deg"].to_numpy(np.float64)[t_idx][sel]
    true_t = np.stack(
        [truth["sim_shift_x_A"].to_numpy(np.float64), truth["sim_shift_y_A"].to_numpy(np.float64)],
        -1,
    )[t_idx][sel]
    dpsi = np.abs(_wrap_deg(true_psi - phi - psi_e))
    dt = np.linalg.norm(true_t - t_e - rs, axis=1)
    return {
        "n_particles": int(sel.sum()),
        "median_psi_error_deg": float(np.median(dpsi)),
        "fraction_psi_within_6deg": float(np.mean(dpsi <= 6.0)),
        "median_shift_error_A": float(np.median(dt)),
        "fraction_shift_within_2px": float(np.mean(dt <= 2.0 * particle_apix)),
    }
