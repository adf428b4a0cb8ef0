"""Simulate a ground-truth particle data set (RELION 3.1 files plus the truth).

Each particle is a projection of a 3D map (a built-in map, see
:data:`BUILTIN_MAPS`, or a density map) along one of a few distinct view
directions (with a small out-of-plane jitter), rotated in plane by ``psi``,
shifted by ``t``, multiplied by a realistic CTF and buried in white Gaussian
noise. A fraction of the particles are junk (empty boxes, blobs, aggregates,
carbon edges). The pose formula,
file layout and the SNR definition are in ``docs/simulation.md``; the formula
is in :func:`napari_class2d.sim.transforms.rotate_and_shift`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_class2d.sim.ctf import shift_and_ctf
from napari_class2d.sim.feed import stream_into
from napari_class2d.sim.files import write_stack, write_star, write_text
from napari_class2d.sim.junk import JUNK_KINDS, make_junk
from napari_class2d.sim.maps import MapError, content_resolution_A, load_map
from napari_class2d.sim.micelle import micelle_particle
from napari_class2d.sim.phantom import default_phantom
from napari_class2d.sim.project import FourierProjector
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import (
    euler_to_matrix,
    fourier_upsample,
    matrix_to_euler,
    rotate_upsampled,
    soft_disk,
)
from napari_class2d.sim.views import choose_view_directions, exact_counts, view_populations

__all__ = [
    "BUILTIN_MAPS",
    "SimulationParams",
    "SimulationResult",
    "simulate_dataset",
    "stream_into",
]

#: maps made on the fly, chosen by name instead of a file (``map_path="micelle"``):
#: ``phantom`` (:mod:`~napari_class2d.sim.phantom`, the default) and ``micelle`` (a
#: membrane protein with a nanobody in a detergent micelle, :mod:`~napari_class2d.sim.micelle`)
BUILTIN_MAPS = ("phantom", "micelle")

#: micrograph size in pixels used for the (fictitious) particle coordinates
MICROGRAPH_SIZE_PX = 4096
#: per-particle defocus spread within a micrograph (ice thickness), Å (standard deviation)
DEFOCUS_SPREAD_A = 50.0
#: images per ``.mrcs`` by default (like particles picked per micrograph)
DEFAULT_PARTICLES_PER_MICROGRAPH = 100


@dataclass(frozen=True)
class SimulationParams:
    """Every parameter of a simulation (recorded in ``truth.json``). Units in the names."""

    n_particles: int = 6000
    box: int = 96
    pixel_size_A: float = 3.0
    snr: float = 0.03
    junk_fraction: float = 0.08
    n_views: int = 14
    rare_views: int = 3
    rare_fraction: float = 0.01
    seed: int = 0
    n_micrographs: int | None = None
    defocus_range_um: tuple[float, float] = (1.0, 2.5)
    max_astigmatism_A: float = 300.0
    max_shift_A: float | None = None
    view_jitter_deg: float = 2.0
    jitter_samples_per_view: int = 16
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    ctf: bool = True
    map_path: str | None = None
    map_pixel_size_A: float | None = None
    phantom_diameter_A: float | None = None
    micelle_fraction: float = 0.4

    @property
    def builtin_map(self) -> str | None:
        """``"phantom"``, ``"micelle"`` or ``None`` (``map_path`` is a file)."""
        if self.map_path is None:
            return "phantom"
        return self.map_path if self.map_path in BUILTIN_MAPS else None

    def validate(self) -> SimulationParams:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        need(self.n_particles >= 1, "n_particles", "must be >= 1")
        need(self.box >= 16 and self.box % 2 == 0, "box", "must be an even number >= 16")
        need(self.pixel_size_A > 0, "pixel_size_A", "must be > 0 Å")
        need(self.snr > 0 and math.isfinite(self.snr), "snr", "must be > 0")
        need(0 <= self.junk_fraction < 1, "junk_fraction", "must be in [0, 1)")
        need(self.n_views >= 1, "n_views", "must be >= 1")
        need(0 <= self.rare_views <= self.n_views, "rare_views", "must be in [0, n_views]")
        need(0 < self.rare_fraction < 1, "rare_fraction", "must be in (0, 1)")
        need(
            self.n_micrographs is None or 1 <= self.n_micrographs <= self.n_particles,
            "n_micrographs",
            "must be between 1 and n_particles",
        )
        lo, hi = self.defocus_range_um
        need(0 < lo <= hi, "defocus_range_um", "must be (low, high) µm with 0 < low <= high")
        need(self.max_astigmatism_A >= 0, "max_astigmatism_A", "must be >= 0 Å")
        need(self.max_shift_A is None or self.max_shift_A >= 0, "max_shift_A", "must be >= 0 Å")
        need(self.view_jitter_deg >= 0, "view_jitter_deg", "must be >= 0 degrees")
        need(self.jitter_samples_per_view >= 1, "jitter_samples_per_view", "must be >= 1")
        need(0 <= self.amplitude_contrast < 1, "amplitude_contrast", "must be in [0, 1)")
        need(0 <= self.micelle_fraction <= 1, "micelle_fraction", "must be in [0, 1]")
        need(
            self.phantom_diameter_A is None or self.builtin_map == "phantom",
            "phantom_diameter_A",
            f"sizes the built-in phantom only (map: {self.map_path})",
        )
        view_populations(self.n_views, self.rare_views, self.rare_fraction, self.junk_fraction)
        return self

    @property
    def resolved_max_shift_A(self) -> float:
        """Largest particle shift in Å (default: 5 % of the box)."""
        if self.max_shift_A is not None:
            return float(self.max_shift_A)
        return 0.05 * self.box * self.pixel_size_A

    @property
    def resolved_n_micrographs(self) -> int:
        if self.n_micrographs is not None:
            return int(self.n_micrographs)
        return max(1, math.ceil(self.n_particles / DEFAULT_PARTICLES_PER_MICROGRAPH))


@dataclass
class SimulationResult:
    """Where a simulation went and what it holds."""

    out_dir: Path
    particles_star: Path
    truth_star: Path
    truth_views: Path
    truth_json: Path
    stack_files: list[Path]
    truth: dict = field(repr=False)
    seconds: float = 0.0


def _volume(p: SimulationParams) -> tuple[torch.Tensor, dict]:
    if p.builtin_map == "micelle":
        particle = micelle_particle(p.micelle_fraction)
        parts = particle.render_parts(p.box, p.pixel_size_A)
        vol = sum(parts.values())
        # the micelle is wider than the protein: the measured diameter is the micelle's
        diameter_px = particle.diameter_px(parts)
        if diameter_px > p.box:
            raise MapError(
                f"map micelle: the particle is about {diameter_px * p.pixel_size_A:.0f} Å across "
                f"but the box is {p.box} px x {p.pixel_size_A} Å = {p.box * p.pixel_size_A:.0f} Å;"
                " use a larger box or pixel size"
            )
        vol = vol / vol.max()
        return vol, {
            "source": "micelle",
            "particle_diameter_A": diameter_px * p.pixel_size_A,
            "content_resolution_A": content_resolution_A(vol, p.pixel_size_A),
            "micelle": particle.summary(),
        }
    if p.builtin_map == "phantom":
        diameter = p.phantom_diameter_A or 0.6 * p.box * p.pixel_size_A
        vol = default_phantom().render(p.box, p.pixel_size_A, 0.5 * diameter)
        vol = vol / vol.max()
        return vol, {
            "source": "phantom",
            "particle_diameter_A": float(diameter),
            "content_resolution_A": content_resolution_A(vol, p.pixel_size_A),
        }
    vol, info = load_map(p.map_path, p.pixel_size_A, p.box, p.map_pixel_size_A)
    info["source"] = "map"
    return vol, info


def _jitter_matrices(n: int, jitter_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` small out-of-plane rotations (the first is the identity), ``(n, 3, 3)``.

    Each is a rotation by ``delta`` (Rayleigh, scale ``jitter_deg``) about an
    axis in the image plane, so it tilts the view without in-plane twist.
    """
    delta = np.deg2rad(jitter_deg) * np.sqrt(-2.0 * np.log1p(-rng.uniform(size=n)))
    delta[0] = 0.0
    beta = rng.uniform(0, 2 * np.pi, size=n)
    axis = np.stack((np.cos(beta), np.sin(beta), np.zeros(n)), -1)
    K = np.zeros((n, 3, 3))
    K[:, 0, 2], K[:, 1, 2] = axis[:, 1], -axis[:, 0]
    K[:, 2, 0], K[:, 2, 1] = -axis[:, 1], axis[:, 0]
    s, c = np.sin(delta)[:, None, None], np.cos(delta)[:, None, None]
    return np.eye(3)[None] + s * K + (1 - c) * (K @ K)


def _plan(p: SimulationParams, rng: np.random.Generator, n_views_total: int) -> dict:
    """Per-particle labels, poses and CTF parameters (small arrays, no images)."""
    n = p.n_particles
    fractions, kinds = view_populations(
        n_views_total, p.rare_views, p.rare_fraction, p.junk_fraction
    )
    counts = exact_counts(n, np.concatenate([fractions, [p.junk_fraction]]))
    view_counts, n_junk = counts[:-1], int(counts[-1])
    junk_names = list(JUNK_KINDS)
    junk_counts = exact_counts(n_junk, np.array(list(JUNK_KINDS.values())))
    view = np.concatenate([np.repeat(np.arange(n_views_total), view_counts), np.full(n_junk, -1)])
    junk_kind = np.concatenate(
        [np.full(n - n_junk, ""), np.repeat(np.array(junk_names), junk_counts)]
    ).astype(object)
    order = rng.permutation(n)
    view, junk_kind = view[order], junk_kind[order]
    is_particle = view >= 0

    psi = np.where(is_particle, rng.uniform(-180.0, 180.0, size=n), 0.0)
    r = p.resolved_max_shift_A * np.sqrt(rng.uniform(size=n))
    phi = rng.uniform(0, 2 * np.pi, size=n)
    shift = np.stack((r * np.cos(phi), r * np.sin(phi)), -1) * is_particle[:, None]
    jitter_index = rng.integers(p.jitter_samples_per_view, size=n)

    n_mic = p.resolved_n_micrographs
    mic = np.repeat(np.arange(n_mic), [len(a) for a in np.array_split(np.arange(n), n_mic)])
    lo, hi = p.defocus_range_um
    mic_defocus = rng.uniform(lo, hi, size=n_mic) * 1e4
    mic_astig = rng.uniform(0, p.max_astigmatism_A, size=n_mic)
    mic_angle = rng.uniform(0.0, 180.0, size=n_mic)
    offset = rng.normal(0.0, DEFOCUS_SPREAD_A, size=n)
    defocus_u = mic_defocus[mic] + 0.5 * mic_astig[mic] + offset
    defocus_v = mic_defocus[mic] - 0.5 * mic_astig[mic] + offset
    coords = _spread_picks(mic, rng.uniform(0.0, 1.0, size=(n, 2)), p.box)
    return {
        "fractions": fractions,
        "kinds": kinds,
        "view_counts": view_counts,
        "junk_counts": dict(zip(junk_names, junk_counts.tolist(), strict=True)),
        "view": view,
        "junk_kind": junk_kind,
        "psi": psi,
        "shift": shift,
        "jitter_index": jitter_index,
        "mic": mic,
        "defocus_u": defocus_u,
        "defocus_v": defocus_v,
        "defocus_angle": mic_angle[mic],
        "coords": coords,
    }


def _spread_picks(mic: np.ndarray, u: np.ndarray, box: int) -> np.ndarray:
    """Pick coordinates (pixels) on each fictitious micrograph, at least ``1.5 * box`` apart.

    The images are simulated one particle at a time, with no neighbour in the box, so the
    picks must not say otherwise (a job masks the neighbouring picks it is told of): each
    micrograph's particles get the cells of a square lattice, in order, jittered within
    their cell by ``u`` (``(N, 2)`` uniform draws in [0, 1)) as far as the spacing allows.
    """
    coords = np.empty_like(u)
    order = np.argsort(mic, kind="stable")
    bounds = np.flatnonzero(np.diff(mic[order])) + 1
    for members in np.split(order, bounds):  # one micrograph at a time (vectorised within)
        side = math.ceil(math.sqrt(len(members)))
        cell = (MICROGRAPH_SIZE_PX - 2 * box) / side
        jitter = max(cell - 1.5 * box, 0.0)
        k = np.arange(len(members))
        corner = np.stack((k % side, k // side), 1) * cell + box + 0.5 * (cell - jitter)
        coords[members] = corner + u[members] * jitter
    return coords


class _SignalMaker:
    """Clean (noise-free) particle signals for any subset of the planned particles."""

    def __init__(self, p: SimulationParams, plan: dict, bank: torch.Tensor, diameter_px: float):
        self.p, self.plan = p, plan
        self.bank_up = fourier_upsample(bank, 2)
        self.diameter_px = diameter_px
        self.peak = float(bank.flatten(1).max(dim=1).values.median())
        self.B = p.jitter_samples_per_view

    def __call__(self, idx: np.ndarray, junk_rng: np.random.Generator | None) -> torch.Tensor:
        p, plan = self.p, self.plan
        view = plan["view"][idx]
        out = torch.zeros((len(idx), p.box, p.box))
        part = np.nonzero(view >= 0)[0]
        if len(part):
            bank_index = view[part] * self.B + plan["jitter_index"][idx[part]]
            out[torch.as_tensor(part)] = rotate_upsampled(
                self.bank_up,
                torch.as_tensor(plan["psi"][idx[part]]),
                p.box,
                index=torch.as_tensor(bank_index),
            )
        junk = np.nonzero(view < 0)[0]
        if len(junk):
            if junk_rng is None:
                raise ValueError("junk images need a random generator")
            out[torch.as_tensor(junk)] = make_junk(
                plan["junk_kind"][idx[junk]].astype(str),
                junk_rng,
                p.box,
                self.bank_up,
                self.diameter_px,
                self.peak,
            )
        ctf = None
        if p.ctf:
            ctf = {
                "defocus_u_A": plan["defocus_u"][idx],
                "defocus_v_A": plan["defocus_v"][idx],
                "defocus_angle_deg": plan["defocus_angle"][idx],
                "voltage_kV": p.voltage_kV,
                "cs_mm": p.cs_mm,
                "amplitude_contrast": p.amplitude_contrast,
            }
        shift_px = torch.as_tensor(plan["shift"][idx] / p.pixel_size_A, dtype=torch.float32)
        return shift_and_ctf(out, shift_px, ctf, p.pixel_size_A)


def _signal_variance(maker: _SignalMaker, plan: dict, diameter_px: float, n_pilot: int = 256):
    """Mean variance of the clean (CTF-modulated) particle signal inside the particle disk."""
    particles = np.nonzero(plan["view"] >= 0)[0]
    if not len(particles):
        return 1.0
    pick = particles[np.linspace(0, len(particles) - 1, min(n_pilot, len(particles))).astype(int)]
    sig = maker(pick, None)
    disk = soft_disk(maker.p.box, 0.5 * diameter_px, edge_px=0.0) > 0.5
    vals = sig[:, disk]
    return float(vals.var(dim=1).mean())


def _optics(p: SimulationParams) -> pd.DataFrame:
    optics = {
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [p.pixel_size_A],
    }
    if p.ctf:
        optics |= {
            "rlnVoltage": [p.voltage_kV],
            "rlnSphericalAberration": [p.cs_mm],
            "rlnAmplitudeContrast": [p.amplitude_contrast],
        }
    optics |= {
        "rlnImagePixelSize": [p.pixel_size_A],
        "rlnImageSize": [p.box],
        "rlnImageDimensionality": [2],
        "rlnCtfDataAreCtfPremultiplied": [0],
    }
    return pd.DataFrame(optics)


def _particles_table(
    p: SimulationParams, plan: dict, idx: np.ndarray, stack_names
) -> pd.DataFrame:
    mic = plan["mic"][idx]
    in_stack = idx - np.searchsorted(plan["mic"], mic)  # micrographs are contiguous blocks
    table = {
        "rlnCoordinateX": np.round(plan["coords"][idx, 0], 1),
        "rlnCoordinateY": np.round(plan["coords"][idx, 1], 1),
        "rlnImageName": [
            f"{k + 1:06d}@{stack_names[m]}" for k, m in zip(in_stack, mic, strict=True)
        ],
        "rlnMicrographName": [f"Micrographs/mic_{m + 1:04d}.mrc" for m in mic],
        "rlnOpticsGroup": np.ones(len(idx), dtype=np.int64),
    }
    if p.ctf:
        table |= {
            "rlnDefocusU": np.round(plan["defocus_u"][idx], 2),
            "rlnDefocusV": np.round(plan["defocus_v"][idx], 2),
            "rlnDefocusAngle": np.round(plan["defocus_angle"][idx], 3),
            "rlnPhaseShift": np.zeros(len(idx)),
            "rlnCtfBfactor": np.zeros(len(idx)),
        }
    return pd.DataFrame(table)


def simulate_dataset(
    out_dir: str | Path,
    map_path: str | Path | None = None,
    n_particles: int = 6000,
    box: int = 96,
    pixel_size_A: float = 3.0,
    snr: float = 0.03,
    junk_fraction: float = 0.08,
    n_views: int = 14,
    rare_views: int = 3,
    rare_fraction: float = 0.01,
    seed: int = 0,
    n_micrographs: int | None = None,
    defocus_range_um: tuple[float, float] = (1.0, 2.5),
    max_shift_A: float | None = None,
    view_jitter_deg: float = 2.0,
    *,
    map_pixel_size_A: float | None = None,
    phantom_diameter_A: float | None = None,
    micelle_fraction: float = 0.4,
    max_astigmatism_A: float = 300.0,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    ctf: bool = True,
    jitter_samples_per_view: int = 16,
    overwrite: bool = False,
    torch_threads_n: int | None = 1,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Simulate a particle data set with known views, poses and junk; write it to ``out_dir``.

    Parameters
    ----------
    out_dir
        Output folder (created). Refuses to overwrite an earlier simulation
        unless ``overwrite=True``.
    map_path
        Density map (``.mrc``) to project, or the name of a built-in map
        (:data:`BUILTIN_MAPS`): ``"phantom"`` (also ``None``: the asymmetric
        phantom) or ``"micelle"`` (a membrane protein with a nanobody in a
        detergent micelle, ~100 Å across; box and pixel size must hold it).
    n_particles, box, pixel_size_A
        Number of images, their edge (even, px) and pixel size (Å).
    snr
        Signal-to-noise ratio: variance of the clean CTF-modulated particle
        signal inside the particle disk (diameter ``particle_diameter_A``,
        averaged over particles) divided by the noise variance.
    junk_fraction
        Fraction of junk images (empty, blobs, aggregates, edges).
    n_views, rare_views, rare_fraction
        View directions (chosen to give clearly different projections); the
        last ``rare_views`` hold ``rare_fraction`` of the particles each, the
        others share the rest (the first quarter 2.5x the others).
    seed
        Everything random follows from it: same seed, same files.
    n_micrographs
        Number of ``.mrcs`` stacks ("micrographs"); default one per 100 particles.
    defocus_range_um
        Mean defocus range per micrograph, µm (stored in Å in the STAR file).
    max_shift_A
        Largest particle shift, Å (default 5 % of the box).
    view_jitter_deg
        Out-of-plane scatter of each particle's direction around its view
        (Rayleigh scale, degrees).
    map_pixel_size_A
        Voxel size of ``map_path`` when its header has none (or is wrong).
    phantom_diameter_A
        Phantom diameter (default 60 % of the box; the built-in phantom only).
    micelle_fraction
        ``map_path="micelle"``: density of the detergent as a fraction of the
        protein's mean density (see :class:`~napari_class2d.sim.micelle.MicelleParticle`).
    max_astigmatism_A, voltage_kV, cs_mm, amplitude_contrast
        Optics: ``defocus U - V`` up to this many Å, kV, mm, fraction.
    ctf
        Apply a CTF (``False``: no CTF and no CTF columns, like negative stain).
    jitter_samples_per_view
        Distinct jittered directions per view (particles pick one at random).
    overwrite
        Replace an earlier simulation in ``out_dir``.
    torch_threads_n
        torch threads while simulating (1 is fastest on small CPUs, see
        :mod:`napari_class2d.sim.threads`; ``None`` keeps torch's setting).
    progress
        Called as ``progress(particles_done, n_particles)`` after each stack.

    Returns
    -------
    SimulationResult
    """
    with torch_threads(torch_threads_n):
        return _simulate(
            out_dir,
            SimulationParams(
                n_particles=int(n_particles),
                box=int(box),
                pixel_size_A=float(pixel_size_A),
                snr=float(snr),
                junk_fraction=float(junk_fraction),
                n_views=int(n_views),
                rare_views=int(rare_views),
                rare_fraction=float(rare_fraction),
                seed=int(seed),
                n_micrographs=n_micrographs,
                defocus_range_um=tuple(float(v) for v in defocus_range_um),
                max_astigmatism_A=float(max_astigmatism_A),
                max_shift_A=max_shift_A,
                view_jitter_deg=float(view_jitter_deg),
                jitter_samples_per_view=int(jitter_samples_per_view),
                voltage_kV=float(voltage_kV),
                cs_mm=float(cs_mm),
                amplitude_contrast=float(amplitude_contrast),
                ctf=bool(ctf),
                map_path=str(map_path) if map_path is not None else None,
                map_pixel_size_A=map_pixel_size_A,
                phantom_diameter_A=phantom_diameter_A,
                micelle_fraction=float(micelle_fraction),
            ).validate(),
            overwrite=overwrite,
            progress=progress,
        )


def _simulate(
    out_dir: str | Path,
    p: SimulationParams,
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> SimulationResult:
    t0 = time.perf_counter()
    out = Path(out_dir)
    stacks_dir = out / "stacks"
    existing = [out / n for n in ("particles.star", "truth.star", "truth.json")]
    if any(f.exists() for f in existing) and not overwrite:
        raise FileExistsError(
            f"{out} already holds a simulation (particles.star / truth.*); pass overwrite=True"
        )
    stacks_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(stacks_dir.glob("mic_*.mrcs")) + list(stacks_dir.glob("mic_*.star")):
            old.unlink()

    rng = np.random.default_rng(p.seed)
    vol, vol_info = _volume(p)
    diameter_A = float(vol_info["particle_diameter_A"])
    diameter_px = diameter_A / p.pixel_size_A
    views = choose_view_directions(vol, p.n_views, rng, p.pixel_size_A, diameter_A)
    plan = _plan(p, rng, p.n_views)

    # projection bank: each view along jitter_samples_per_view directions (entry 0 exact)
    A_view = euler_to_matrix(views["rot_deg"], views["tilt_deg"], 0.0)  # (V, 3, 3)
    B = p.jitter_samples_per_view
    J = _jitter_matrices(p.n_views * B, p.view_jitter_deg, rng).reshape(p.n_views, B, 3, 3)
    for v in range(p.n_views):
        J[v, 0] = np.eye(3)
    A_bank = (J @ A_view[:, None]).reshape(-1, 3, 3)
    bank = FourierProjector(vol).project_matrices(A_bank)
    maker = _SignalMaker(p, plan, bank, diameter_px)

    signal_var = _signal_variance(maker, plan, diameter_px)
    sigma = math.sqrt(signal_var / p.snr)

    # per-particle full orientation (for 3D use) and jitter angle
    is_particle = plan["view"] >= 0
    bank_idx = np.where(is_particle, plan["view"] * B + plan["jitter_index"], 0)
    A_part = euler_to_matrix(0.0, 0.0, plan["psi"]) @ A_bank[bank_idx]
    e_rot, e_tilt, e_psi = matrix_to_euler(A_part)
    cos_j = np.einsum(
        "ni,ni->n", A_bank[bank_idx][:, 2], A_view[np.maximum(plan["view"], 0)][:, 2]
    )
    jitter_angle = np.rad2deg(np.arccos(np.clip(cos_j, -1, 1)))

    n_mic = p.resolved_n_micrographs
    stack_names = [f"mic_{m + 1:04d}.mrcs" for m in range(n_mic)]
    optics = _optics(p)
    stack_files: list[Path] = []
    done = 0
    for m in range(n_mic):
        idx = np.nonzero(plan["mic"] == m)[0]
        junk_rng = np.random.default_rng([p.seed, 2, m])
        noise_rng = np.random.default_rng([p.seed, 3, m])
        sig = maker(idx, junk_rng).numpy()
        images = sig / sigma + noise_rng.standard_normal(sig.shape, dtype=np.float32)
        stack = write_stack(stacks_dir / stack_names[m], images, p.pixel_size_A)
        write_star(
            stacks_dir / f"mic_{m + 1:04d}.star",
            {"optics": optics, "particles": _particles_table(p, plan, idx, stack_names)},
        )
        stack_files.append(stack)
        done += len(idx)
        if progress is not None:
            progress(done, p.n_particles)

    all_idx = np.arange(p.n_particles)
    particles = _particles_table(p, plan, all_idx, [f"stacks/{s}" for s in stack_names])
    particles_star = write_star(out / "particles.star", {"optics": optics, "particles": particles})

    truth = pd.DataFrame(
        {
            "rlnImageName": particles["rlnImageName"],
            "sim_view": plan["view"].astype(np.int64),
            "sim_junk_kind": np.where(is_particle, "none", plan["junk_kind"].astype(str)),
            "sim_psi_deg": np.round(plan["psi"], 4),
            "sim_shift_x_A": np.round(plan["shift"][:, 0], 4),
            "sim_shift_y_A": np.round(plan["shift"][:, 1], 4),
            "sim_rot_deg": np.round(np.where(is_particle, e_rot, 0.0), 4),
            "sim_tilt_deg": np.round(np.where(is_particle, e_tilt, 0.0), 4),
            "sim_euler_psi_deg": np.round(np.where(is_particle, e_psi, 0.0), 4),
            "sim_jitter_deg": np.round(np.where(is_particle, jitter_angle, 0.0), 4),
            "sim_micrograph": plan["mic"].astype(np.int64) + 1,
        }
    )
    truth_star = write_star(out / "truth.star", {"truth": truth})
    view_images = (bank.reshape(p.n_views, B, p.box, p.box)[:, 0] / sigma).numpy()
    truth_views = write_stack(out / "truth_views.mrcs", view_images, p.pixel_size_A)

    seconds = time.perf_counter() - t0
    params = asdict(p)
    params["max_shift_A"] = p.resolved_max_shift_A
    params["n_micrographs"] = n_mic
    info = {
        "format": "napari-class2d simulation",
        "version": 1,
        "parameters": params,
        "volume": vol_info,
        "box": p.box,
        "pixel_size_A": p.pixel_size_A,
        "particle_diameter_A": diameter_A,
        "n_particles": p.n_particles,
        "n_views": p.n_views,
        "n_micrographs": n_mic,
        "noise": {
            "snr": p.snr,
            "definition": (
                "variance of the clean CTF-modulated particle signal inside the particle "
                "disk (mean over particles) / noise variance"
            ),
            "signal_variance_in_disk": signal_var,
            "noise_sigma": sigma,
            "image_scale": "images = signal / noise_sigma + N(0, 1): the noise has std 1",
        },
        "views": [
            {
                "view": v,
                "kind": plan["kinds"][v],
                "rot_deg": float(views["rot_deg"][v]),
                "tilt_deg": float(views["tilt_deg"][v]),
                "n_particles": int(plan["view_counts"][v]),
                "fraction": int(plan["view_counts"][v]) / p.n_particles,
                "max_similarity_to_other_views": float(views["max_similarity"][v]),
            }
            for v in range(p.n_views)
        ],
        "rare_views": [v for v in range(p.n_views) if plan["kinds"][v] == "rare"],
        "junk": {"n_particles": int((~is_particle).sum()), "kinds": plan["junk_counts"]},
        "pose_convention": (
            "particle(x) = view(R(psi) (x - t)), x = (col - D//2, row - D//2) px, "
            "t = (sim_shift_x_A, sim_shift_y_A) / pixel_size_A, "
            "R(psi) = [[cos, -sin], [sin, cos]]; "
            "RELION: rlnAnglePsi = sim_psi_deg, rlnOriginXAngst = -sim_shift_x_A, "
            "rlnOriginYAngst = -sim_shift_y_A"
        ),
        "files": {
            "particles": "particles.star",
            "stacks": [f"stacks/{s}" for s in stack_names],
            "per_micrograph_star": [f"stacks/mic_{m + 1:04d}.star" for m in range(n_mic)],
            "truth": "truth.star",
            "truth_views": "truth_views.mrcs",
        },
        "seconds": round(seconds, 3),
    }
    truth_json = write_text(out / "truth.json", json.dumps(info, indent=2) + "\n")
    return SimulationResult(
        out_dir=out,
        particles_star=particles_star,
        truth_star=truth_star,
        truth_views=truth_views,
        truth_json=truth_json,
        stack_files=stack_files,
        truth=info,
        seconds=seconds,
    )
