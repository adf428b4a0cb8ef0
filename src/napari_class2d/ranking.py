"""Class ranking and auto-selection with a rare-view guard, without Qt.

Every class of a result gets a score in [0, 1] from what the job knows about it and
what its average shows (:func:`class_features`, :func:`score_classes`), and
:func:`auto_select` keeps the classes scoring at least a threshold. Before a class is
rejected, the **rare-view guard** compares its average with the averages of the kept
classes (best in-plane rotation and shift, band-passed; :func:`napari_class2d.compare.
match_images`): a class that looks like a particle and that no kept class matches is a
distinct view, and is kept and marked "distinct view, few particles" however few
particles it holds. The user's choice always wins over the ranking: the widget and the
command apply it on top (:func:`apply_user_choice`).

The features and the rule were chosen, and the defaults measured, on the simulated
benchmark sets (``benchmarks/selection.py``; figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from napari_class2d.compare import match_images
from napari_class2d.engine.lineage import exchange_partners, flags_from_document, stability
from napari_class2d.selection import ClassificationResult
from napari_class2d.texture import (
    NOISE_TEXTURE_THRESHOLD,
    blank_averages,
    fine_power_fraction,
    outer_energy_fraction,
)

#: classes scoring at least this are kept by default (measured: docs/benchmarks.md)
DEFAULT_THRESHOLD = 0.5
#: a rejected class is a distinct view when its best match with a kept class is further
#: from a perfect match (1) than this many times the typical particle-like class's distance
#: to its nearest neighbour (the level at which classes of one view match in this result)
DISTINCT_VIEW_FACTOR = 2.5
#: the guard keeps a distinct view whose quality (its score without size and similarity)
#: reaches this, or the threshold when that is lower: on the benchmark sets junk classes
#: reach at most 0.18 (0.31 on a run that missed the rare views) and classes that recover
#: a rare view at least 0.47 (docs/benchmarks.md)
GUARD_MIN_QUALITY = 0.4
#: band of the class-to-class comparison, as multiples of the particle diameter (coarse)
#: and Å (fine)
SIMILARITY_LOW_DIAMETERS = 1.0
SIMILARITY_HIGH_A = 12.0

GUARD_MARK = "distinct view, few particles"


@dataclass(frozen=True)
class ClassFeatures:
    """What is known about each class, ``(K,)`` arrays (class k at index k-1).

    Attributes
    ----------
    count
        Particles in the class.
    resolution_A
        The job's estimate (FRC 0.5 of half-set averages; inf when unknown).
    eca
        Effective number of classes assigned (nan when the result has none).
    mean_max_probability
        Mean ``rlnMaxValueProbDistribution`` of its particles (nan when absent).
    outer_energy_fraction, fine_power_fraction
        The noise-texture measures of :mod:`napari_class2d.texture` (nan when blank).
    roundness
        Correlation of the average with its own rotational average inside 0.6 x the
        particle diameter (1: a round blob).
    blank
        The average is blank (an empty class).
    similarity
        Best match score of the average with any other populated class (best in-plane
        rotation and shift, band-passed; nan when not computed).
    most_similar
        1-based class of that best match (0 when none).
    stability
        Mean fraction of its particles the class kept over the last updates, from the
        lineage record (nan without one).
    swaps_with
        Classes it exchanged its particles with in the last updates (lineage).
    lineage_flag
        What the lineage record says about the class ("" when nothing; splits included).
    lineage_warning
        The lineage's warning for the class ("" when none): emptied or merged since the
        classes settled, or swapping its particles with another class.
    particle_diameter_A
        The particle diameter the measures were taken with, Å.
    similarity_matrix
        ``(K, K)`` match scores between classes (nan on the diagonal and for blank
        classes), or ``None`` when not computed.
    """

    count: np.ndarray
    resolution_A: np.ndarray
    eca: np.ndarray
    mean_max_probability: np.ndarray
    outer_energy_fraction: np.ndarray
    fine_power_fraction: np.ndarray
    roundness: np.ndarray
    blank: np.ndarray
    similarity: np.ndarray
    most_similar: np.ndarray
    stability: np.ndarray
    swaps_with: list = field(default_factory=list)
    lineage_flag: list = field(default_factory=list)
    lineage_warning: list = field(default_factory=list)
    particle_diameter_A: float = 0.0
    similarity_matrix: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(self.count)

    def table(self) -> pd.DataFrame:
        """One row per class (``class`` 1-based) with every feature."""
        return pd.DataFrame(
            {
                "class": np.arange(1, self.n_classes + 1),
                "count": self.count,
                "resolution_A": self.resolution_A,
                "eca": self.eca,
                "mean_max_probability": self.mean_max_probability,
                "outer_energy_fraction": self.outer_energy_fraction,
                "fine_power_fraction": self.fine_power_fraction,
                "roundness": self.roundness,
                "blank": self.blank,
                "similarity": self.similarity,
                "most_similar": self.most_similar,
                "stability": self.stability,
            }
        )


# -- features ---------------------------------------------------------------------------------
def mask_diameter_from_averages(averages: np.ndarray, pixel_size_A: float) -> float | None:
    """The diameter (Å) outside which every average is flat: the mask the job applied.

    Both this engine and RELION mask the class averages (by default at the particle
    diameter); beyond the mask the averages are constant. ``None`` when no such radius.
    """
    x = np.asarray(averages, dtype=np.float64)
    box = x.shape[-1]
    c = np.arange(box) - box // 2
    r = np.hypot(c[:, None], c[None, :])
    spread = x.std(axis=0)  # per pixel, over classes
    edges = np.arange(0, box // 2 + 1)
    ring = np.digitize(r, edges) - 1
    prof = np.array([spread[ring == i].mean() if (ring == i).any() else 0.0 for i in edges])
    top = prof.max()
    if top <= 0:
        return None
    flat = np.nonzero(prof < 1e-3 * top)[0]
    flat = flat[flat > 2]
    if not len(flat) or flat[0] >= box // 2:
        return None
    return float(2 * flat[0] * pixel_size_A)


#: the engine's default mask: its outer edge at this multiple of the particle diameter
MASK_OUTER_FACTOR = 1.2


def particle_diameter(result: ClassificationResult) -> float:
    """The particle diameter to judge the averages with, Å: the job's
    (``rlnParticleDiameter`` of the model or RELION's optimiser file), else the outer edge
    of the averages' mask divided by :data:`MASK_OUTER_FACTOR`, else 80 % of the box."""
    if result.particle_diameter_A:
        return float(result.particle_diameter_A)
    apix = result.pixel_size_A or 1.0
    avg = result.class_averages
    if avg is not None:
        found = mask_diameter_from_averages(avg, apix)
        if found:
            return found / MASK_OUTER_FACTOR
        return 0.8 * avg.shape[-1] * apix
    return 0.0


def roundness(averages: np.ndarray, pixel_size_A: float, particle_diameter_A: float):
    """``(K,)`` correlation of each average with its rotational average (nan when blank).

    Taken inside ``0.6 x`` the particle diameter after subtracting the mean of the
    annulus from ``0.35`` to ``0.6 x`` the diameter (as :mod:`napari_class2d.texture`).
    """
    x = np.asarray(averages, dtype=np.float64)
    box = x.shape[-1]
    c = np.arange(box) - box // 2
    r = np.hypot(c[:, None], c[None, :])
    r_A = r * pixel_size_A
    outer = min(0.6 * particle_diameter_A, 0.5 * box * pixel_size_A)
    core = min(0.35 * particle_diameter_A, 0.9 * outer)
    inside = r_A < outer
    annulus = inside & (r_A >= core)
    y = x - x[:, annulus].mean(axis=1)[:, None, None]
    ring = np.rint(r).astype(int)
    n_ring = np.bincount(ring[inside])
    out = np.full(len(x), np.nan)
    for k in range(len(x)):  # classes, not particles
        sums = np.bincount(ring[inside], weights=y[k][inside])
        prof = sums / np.maximum(n_ring, 1)
        a = y[k][inside]
        b = prof[ring[inside]]
        den = math.sqrt(float((a * a).sum() * (b * b).sum()))
        if den > 0:
            out[k] = float((a * b).sum() / den)
    return out


def class_similarity(
    averages: np.ndarray,
    pixel_size_A: float,
    particle_diameter_A: float,
    compare_to: np.ndarray | None = None,
) -> np.ndarray:
    """``(K, K)`` match scores of every average with every other (best in-plane rotation
    and shift, band-passed from the particle diameter to :data:`SIMILARITY_HIGH_A`, under a
    mask of 1.1 x the diameter); the diagonal and classes not in ``compare_to`` (bool
    ``(K,)``) are nan."""
    x = torch.as_tensor(np.asarray(averages, dtype=np.float32))
    k = x.shape[0]
    out = np.full((k, k), np.nan)
    use = np.ones(k, bool) if compare_to is None else np.asarray(compare_to, bool)
    idx = np.nonzero(use)[0]
    if len(idx) < 2:
        return out
    high = max(SIMILARITY_HIGH_A, 2.5 * pixel_size_A)
    # nothing finer than the band is compared: a box whose Nyquist is a third finer
    box = x.shape[-1]
    small = 2 * math.ceil(box * pixel_size_A / (high / 1.5) / 2)
    if small < box:
        x = fourier_crop(x, small)
        pixel_size_A = pixel_size_A * box / small
        box = small
    low = min(SIMILARITY_LOW_DIAMETERS * particle_diameter_A, 0.5 * box * pixel_size_A)
    mask = min(1.1 * particle_diameter_A, 0.9 * box * pixel_size_A)
    with torch.no_grad():
        m = match_images(
            x[idx],
            x[idx],
            pixel_size_A,
            mask_diameter_A=mask,
            band_A=(low, high),
            rotation_step_deg=5.0,
            max_shift_A=0.1 * particle_diameter_A,
        )
    score = m.score.numpy().astype(np.float64)
    # the score is not quite symmetric (each side turned once); take the better of the two
    score = np.maximum(score, score.T)
    out[np.ix_(idx, idx)] = score
    np.fill_diagonal(out, np.nan)
    return out


def fourier_crop(images: torch.Tensor, box: int) -> torch.Tensor:
    """``(N, D, D)`` images Fourier-cropped to ``(N, box, box)`` (``box`` even, < D)."""
    d = images.shape[-1]
    ft = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1))
    s = d // 2 - box // 2
    crop = ft[..., s : s + box, s : s + box]
    out = torch.fft.ifft2(torch.fft.ifftshift(crop, dim=(-2, -1))).real
    return out * (box * box) / (d * d)


def class_features(
    result: ClassificationResult,
    particle_diameter_A: float | None = None,
    similarity: bool = True,
) -> ClassFeatures:
    """Every feature of every class of ``result`` (see :class:`ClassFeatures`).

    Parameters
    ----------
    result
        A loaded classification result (its class averages are needed).
    particle_diameter_A
        The particle diameter, Å (default: :func:`particle_diameter`).
    similarity
        Compare the averages with each other (the slowest part: 5-10 s for 50 classes,
        2,500 pairs, on one busy CPU core; it grows with the square of the classes).
    """
    if result.class_averages is None:
        raise ValueError(f"{result.data_star}: the result has no class averages to rank")
    avg = np.asarray(result.class_averages, dtype=np.float32)
    apix = float(result.pixel_size_A or 1.0)
    diameter = float(particle_diameter_A or particle_diameter(result))
    k = result.n_classes
    counts = result.class_counts.astype(np.float64)

    def per_class_mean(column: str) -> np.ndarray:
        if column not in result.particles:
            return np.full(k, np.nan)
        values = pd.to_numeric(result.particles[column], errors="coerce").to_numpy(float)
        ok = np.isfinite(values)
        sums = np.bincount(result.class_number[ok] - 1, weights=values[ok], minlength=k)[:k]
        n = np.bincount(result.class_number[ok] - 1, minlength=k)[:k]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, sums / np.maximum(n, 1), np.nan)

    blank = blank_averages(avg) | (counts == 0)
    sim = np.full(k, np.nan)
    most = np.zeros(k, dtype=np.int64)
    matrix = None
    if similarity:
        matrix = class_similarity(avg, apix, diameter, compare_to=~blank)
        has = np.isfinite(matrix).any(axis=1)
        sim[has] = np.nanmax(matrix[has], axis=1)
        most[has] = np.nanargmax(matrix[has], axis=1) + 1
    stab = np.full(k, np.nan)
    swaps: list = [[] for _ in range(k)]
    flags = [""] * k
    warnings = [""] * k
    lineage = result.lineage
    if lineage is not None and int(lineage["n_classes"]) == k:
        stab = stability(lineage)
        for c, partners in exchange_partners(lineage).items():
            swaps[c - 1] = sorted(partners)
        flags = flags_from_document(lineage)
        warnings = flags_from_document(lineage, warnings_only=True)
    return ClassFeatures(
        count=counts,
        resolution_A=np.asarray(result.class_resolution_A, dtype=np.float64),
        eca=np.asarray(result.class_eca, dtype=np.float64),
        mean_max_probability=per_class_mean("rlnMaxValueProbDistribution"),
        outer_energy_fraction=outer_energy_fraction(avg, apix, diameter),
        fine_power_fraction=fine_power_fraction(avg, apix, diameter),
        roundness=roundness(avg, apix, diameter),
        blank=blank,
        similarity=sim,
        most_similar=most,
        stability=stab,
        swaps_with=swaps,
        lineage_flag=flags,
        lineage_warning=warnings,
        particle_diameter_A=diameter,
        similarity_matrix=matrix,
    )


# -- scoring ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreWeights:
    """A logistic score: ``score = 1 / (1 + exp(-(bias + sum w_i x_i)))``.

    The terms ``x_i`` (:func:`score_terms`) are relative to the result's typical class
    (the particle-weighted median over populated classes), so the same weights serve data
    sets of different size, resolution and signal.
    """

    bias: float
    resolution: float  # x = log2(resolution / typical resolution)
    probability: float  # x = log2(mean max probability / typical)
    texture: float  # x = log2(outer energy fraction / typical), at least 0
    noise_texture: float  # x = 1 when the outer energy fraction is a noise texture's
    instability: float  # x = log2((1 - particles kept) / (1 - typical)), from the lineage
    count: float  # x = log2(count / typical count)
    similarity: float  # x = log2((1 - best match) / (1 - typical best match))


#: chosen on the simulated benchmark sets (benchmarks/selection.py; docs/benchmarks.md)
DEFAULT_WEIGHTS = ScoreWeights(
    bias=2.0,
    resolution=-2.0,
    probability=2.0,
    texture=-1.0,
    noise_texture=-4.0,
    # measured on the sets with a lineage record: a weight of -0.5 lost 4-6 % of the
    # non-junk particles and let the guard keep a stable blob class (docs/benchmarks.md)
    instability=0.0,
    count=0.5,
    similarity=0.0,
)
#: the terms that describe the class itself; count and similarity describe its company
QUALITY_TERMS = ("resolution", "probability", "texture", "noise_texture", "instability")
TERMS = QUALITY_TERMS + ("count", "similarity")


#: outer energy fractions below this count as this: their ratios would be noise (the
#: simulated sets' classes sit at 0.01-0.04, real averages at 0.03-0.14)
OUTER_ENERGY_FLOOR = 0.02


def _typical(values: np.ndarray, counts: np.ndarray) -> float:
    """The particle-weighted median of ``values`` over populated classes with a value."""
    ok = np.isfinite(values) & (counts > 0)
    if not ok.any():
        return float("nan")
    v, w = values[ok], counts[ok]
    order = np.argsort(v)
    cum = np.cumsum(w[order])
    return float(v[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _log2_ratio(values: np.ndarray, typical: float, unknown: float = 0.0) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.log2(values / typical) if typical > 0 else np.full(len(values), np.nan)
    return np.where(np.isfinite(out), out, unknown)


def score_terms(features: ClassFeatures) -> dict[str, np.ndarray]:
    """The terms of the score per class (see :class:`ScoreWeights`).

    An unknown resolution counts as twice as coarse as typical; other unknown values as
    typical (a result without a lineage record has no instability term). The outer energy
    fraction (how much of the average's contrast lies outside the particle's core) counts
    against a class only where it exceeds the typical class's, and as a noise texture above
    :data:`napari_class2d.texture.NOISE_TEXTURE_THRESHOLD`.
    The fine power fraction is not used: large particles at a few Å per pixel have real
    detail finer than ``D/6`` (the best ribosome classes of the benchmark reach 0.45).
    """
    counts = features.count
    res = np.where(np.isfinite(features.resolution_A), features.resolution_A, np.nan)
    oef = features.outer_energy_fraction
    # small values are floored: their ratios would be noise
    oef = np.fmax(oef, OUTER_ENERGY_FLOOR)
    dissim = 1.0 - np.clip(features.similarity, 0.0, 0.99)
    unstable = 1.0 - np.clip(features.stability, 0.0, 0.99)
    return {
        "resolution": _log2_ratio(res, _typical(res, counts), unknown=1.0),
        "probability": _log2_ratio(
            features.mean_max_probability, _typical(features.mean_max_probability, counts)
        ),
        "texture": np.maximum(_log2_ratio(oef, _typical(oef, counts)), 0.0),
        "noise_texture": (np.nan_to_num(oef, nan=0.0) > NOISE_TEXTURE_THRESHOLD).astype(float),
        "instability": _log2_ratio(unstable, _typical(unstable, counts)),
        "count": _log2_ratio(np.maximum(counts, 0.5), _typical(counts.astype(float), counts)),
        "similarity": _log2_ratio(dissim, _typical(dissim, counts)),
    }


def score_classes(
    features: ClassFeatures, weights: ScoreWeights = DEFAULT_WEIGHTS, *, with_count=True
) -> np.ndarray:
    """``(K,)`` scores in [0, 1]: how likely each class holds particles, not junk.

    ``with_count=False`` scores every class on :data:`QUALITY_TERMS` only, as if it held
    the typical number of particles and were as like its neighbours as the typical class
    (what the rare-view guard asks). Blank (empty) classes score 0.
    """
    t = score_terms(features)
    names = TERMS if with_count else QUALITY_TERMS
    z = weights.bias + sum(getattr(weights, n) * t[n] for n in names)
    out = 1.0 / (1.0 + np.exp(-z))
    out[features.blank] = 0.0
    return out


# -- auto-selection --------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoSelection:
    """What :func:`auto_select` decided, per class (index k-1).

    Attributes
    ----------
    score
        ``(K,)`` the ranking score in [0, 1].
    quality
        ``(K,)`` the score without the particle count and the similarity (the guard's).
    keep
        ``(K,)`` bool: kept (score at least the threshold, or guarded).
    guarded
        ``(K,)`` bool: kept by the rare-view guard ("distinct view, few particles").
    closest_kept
        ``(K,)`` best match score with a kept class (nan when not compared).
    closest_kept_class
        ``(K,)`` 1-based class of that match (0 when none).
    reasons
        Per class a short text: why kept or rejected.
    threshold
        The threshold used.
    features
        The features the decision was taken from.
    """

    score: np.ndarray
    quality: np.ndarray
    keep: np.ndarray
    guarded: np.ndarray
    closest_kept: np.ndarray
    closest_kept_class: np.ndarray
    reasons: list
    threshold: float
    features: ClassFeatures
    guard: bool = True

    def kept_classes(self) -> np.ndarray:
        """1-based numbers of the kept classes."""
        return np.nonzero(self.keep)[0] + 1

    def at_threshold(self, threshold: float) -> AutoSelection:
        """The same ranking at another threshold (the guard is applied again)."""
        f = self.features
        return decide(f, self.score, self.quality, threshold, f.similarity_matrix, self.guard)


def _reason(f: ClassFeatures, k: int, t: dict, kept: bool, guarded: bool, match, match_k):
    if f.blank[k]:
        return "empty"
    if guarded:
        return f"{GUARD_MARK} (best match with a kept class {match:.2f}, class {match_k})"
    notes = []
    if t["noise_texture"][k] > 0:
        notes.append("noise texture")
    elif t["texture"][k] >= 1.0:
        notes.append(f"density outside the core ({f.outer_energy_fraction[k]:.2f})")
    if t["resolution"][k] >= 0.5:
        res = f.resolution_A[k]
        notes.append(f"resolution {res:.0f} Å" if np.isfinite(res) else "resolution unknown")
    if t["probability"][k] <= -0.5:
        notes.append(f"low probability {f.mean_max_probability[k]:.2f}")
    if t["count"][k] <= -2:
        notes.append(f"{int(f.count[k])} particles")
    if kept:
        return "kept" + (f" despite {', '.join(notes)}" if notes else "")
    if not notes and np.isfinite(match):
        notes.append(f"like kept class {match_k} ({match:.2f})")
    return "rejected" + (f": {', '.join(notes)}" if notes else "")


def same_view_level(matches: np.ndarray, classes: np.ndarray, counts: np.ndarray) -> float:
    """The match score above which two classes count as the same view in this result:
    ``1 - DISTINCT_VIEW_FACTOR * (1 - m)``, ``m`` the particle-weighted median over
    ``classes`` (bool) of each one's best match with another of them."""
    idx = np.nonzero(classes)[0]
    if len(idx) < 2:
        return float("nan")
    sub = matches[np.ix_(idx, idx)]
    best = np.where(
        np.isfinite(sub).any(axis=1), np.nanmax(np.nan_to_num(sub, nan=-1.0), 1), np.nan
    )
    typical = _typical(best, counts[idx])
    return 1.0 - DISTINCT_VIEW_FACTOR * (1.0 - typical)


def decide(
    features: ClassFeatures,
    score: np.ndarray,
    quality: np.ndarray,
    threshold: float,
    matches: np.ndarray | None,
    guard: bool = True,
) -> AutoSelection:
    """Keep the classes scoring at least ``threshold``; then the rare-view guard keeps a
    rejected class whose quality reaches :data:`GUARD_MIN_QUALITY` (or the threshold, if
    lower) and whose best match with the kept classes stays below :func:`same_view_level`
    (``matches``: the ``(K, K)`` class similarity)."""
    k = features.n_classes
    keep = (score >= threshold) & ~features.blank
    guarded = np.zeros(k, bool)
    closest = np.full(k, np.nan)
    closest_k = np.zeros(k, np.int64)
    if guard and matches is not None:
        gate = min(threshold, GUARD_MIN_QUALITY)
        particle_like = ~features.blank & (quality >= gate)
        # what "the same view" means here is measured on every particle-like class, so
        # it does not move with the threshold
        level = same_view_level(matches, particle_like, features.count)
        # strongest candidates first, each compared with what is kept so far
        candidates = np.nonzero(~keep & particle_like)[0]
        for c in candidates[np.argsort(-quality[candidates], kind="stable")]:
            row = np.where(keep, matches[c], np.nan)
            if np.isfinite(row).any():
                closest[c] = np.nanmax(row)
                closest_k[c] = int(np.nanargmax(row)) + 1
            if not np.isfinite(closest[c]) or not closest[c] >= level:
                keep[c] = guarded[c] = True
    terms = score_terms(features)
    reasons = [
        _reason(features, c, terms, bool(keep[c]), bool(guarded[c]), closest[c], closest_k[c])
        for c in range(k)
    ]
    out = AutoSelection(
        score=score,
        quality=quality,
        keep=keep,
        guarded=guarded,
        closest_kept=closest,
        closest_kept_class=closest_k,
        reasons=reasons,
        threshold=float(threshold),
        features=features if matches is features.similarity_matrix else _with(features, matches),
        guard=guard,
    )
    return out


def _with(features: ClassFeatures, matches: np.ndarray | None) -> ClassFeatures:
    return dataclasses.replace(features, similarity_matrix=matches)


def auto_select(
    result: ClassificationResult,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    features: ClassFeatures | None = None,
    weights: ScoreWeights = DEFAULT_WEIGHTS,
    guard: bool = True,
    particle_diameter_A: float | None = None,
) -> AutoSelection:
    """Rank the classes of ``result`` and keep those scoring at least ``threshold``, and
    the distinct views the rare-view guard finds among the others.

    Parameters
    ----------
    result
        A loaded classification result with class averages.
    threshold
        Score in [0, 1] a class needs (default :data:`DEFAULT_THRESHOLD`).
    features
        Features already computed (:func:`class_features`); computed when ``None``.
    weights
        The score's weights.
    guard
        Apply the rare-view guard.
    particle_diameter_A
        Particle diameter, Å (default: the job's, see :func:`particle_diameter`).
    """
    if features is None:
        features = class_features(result, particle_diameter_A, similarity=guard)
    score = score_classes(features, weights)
    quality = score_classes(features, weights, with_count=False)
    matches = features.similarity_matrix
    if guard and matches is None:
        matches = class_similarity(
            result.class_averages,
            float(result.pixel_size_A or 1.0),
            features.particle_diameter_A,
            compare_to=~features.blank,
        )
    return decide(features, score, quality, threshold, matches, guard)


def apply_user_choice(selection: AutoSelection, user: dict[int, bool]) -> np.ndarray:
    """``(K,)`` bool: the auto-selection with the user's choices on top (``{class: keep}``,
    1-based); the user's click always wins."""
    keep = selection.keep.copy()
    for k, kept in user.items():
        keep[int(k) - 1] = bool(kept)
    return keep
