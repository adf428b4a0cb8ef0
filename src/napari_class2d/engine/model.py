"""The classifier state and one EM iteration (E-step over particles, M-step).

Sufficient statistics are kept per half set (for FRC resolution) in the class
frame: ``num[h, k, f] = Σ γ R⁻¹S⁻¹(w·CTF·X)`` and ``den[h, k, f] = Σ γ R⁻¹(w·CTF²)``.
Online EM blends each mini-batch's statistics into the running ones with step
size η: ``S ← (1 - η) S + η S_batch`` (η = 1 for the first online iteration
and every full iteration, :data:`ONLINE_STEP_SIZE` afterwards), so the running
statistics stay in "one mini-batch" units and old, worse alignments fade.
The E-step aligns each half set to the other half's averages
(:meth:`Class2DModel._search_references`).

Distributed jobs: the lines marked ``# distributed:`` are the seams where a process
works on its own particles only and where the statistics of all processes are
summed (:mod:`napari_class2d.engine.distributed`); with one process they do nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from napari_class2d.engine.config import Class2DConfig, ResolvedParams
from napari_class2d.engine.distributed import LOCAL, Reducer
from napari_class2d.engine.fourier import (
    FourierGrid,
    rotate_even_spectrum,
    rotated_coefficients,
    soft_circle,
)
from napari_class2d.engine.pool import ParticlePool
from napari_class2d.engine.reconstruct import (
    back_rotate,
    centre_of_mass_shift,
    clamp_solvent,
    class_power,
    current_radius,
    half_set_signal,
    orientable_ssnr,
    regularised_average,
    resolution_from_frc,
    rotated_ctf_weight,
    signal_prior,
)
from napari_class2d.engine.search import (
    PhaseTable,
    SearchResult,
    SearchSpace,
    SearchTables,
    search,
)

#: step size of online-EM iterations after the first (documented in docs/parameters.md)
ONLINE_STEP_SIZE = 0.5
#: step size of full iterations: the running statistics, scaled to all particles, keep
#: half the weight, so no class average rests on a single E-step (on real particles a
#: single pass leaves small classes with their members' background as texture)
FULL_STEP_SIZE = 0.5
#: posteriors below this (relative to the particle's best class) do not enter the M-step
MIN_WEIGHT = 0.01
#: iterations aligned to the full averages before each half set is aligned to the other's
CROSS_HALF_START = 3
#: a class whose soft or hard count falls below this fraction of the mean is "emptied"
EMPTY_FRACTION = 0.05
#: at most one class in this many is re-seeded per iteration (see _reseed)
MAX_RESEED_SHARE = 10
#: members whose first principal component splits a class (see _split)
SPLIT_SAMPLE = 256
#: bytes of shifted particle coefficients a marginalised chunk holds at once
BUCKET_CHUNK_BYTES = 64e6
#: a particle keeps its best pose when at least this much of its rotation posterior (best
#: class, coarse pass) lies within one coarse step of the best rotation; otherwise its
#: rotations are marginalised (see Class2DModel.iterate)
SHARP_POSTERIOR = 0.8


@dataclass
class ParticleAssignments:
    """Per-particle results of the latest E-step that visited each particle."""

    best_class: np.ndarray  # int64, 0-based, -1 = never visited
    psi_deg: np.ndarray
    shift_px: np.ndarray  # (N, 2) x, y working pixels: the particle is the class shifted by this
    max_prob: np.ndarray
    ess_pose: np.ndarray
    ess_class: np.ndarray
    loglik: np.ndarray

    @classmethod
    def empty(cls, n: int = 0) -> ParticleAssignments:
        return cls(
            np.full(n, -1, np.int64),
            np.zeros(n),
            np.zeros((n, 2)),
            np.zeros(n),
            np.zeros(n),
            np.zeros(n),
            np.zeros(n),
        )

    def grow(self, n: int) -> None:
        extra = ParticleAssignments.empty(n - len(self.best_class))
        for name in self.__dataclass_fields__:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(extra, name)]))


@dataclass
class _ChunkResult:
    """One E-step chunk: class posteriors and each particle's best class and pose."""

    gamma: torch.Tensor  # (B, K) class posterior
    best: torch.Tensor  # (B,) best class
    rotation: torch.Tensor  # (B,) fine rotation index of its best pose
    shift: torch.Tensor  # (B, 2) px
    max_prob: torch.Tensor  # (B,) posterior of the best class and pose
    ess_pose: torch.Tensor  # (B,) effective number of poses
    loglik: torch.Tensor  # (B,) pose-dependent log-likelihood of the best class
    search: SearchResult
    broad: torch.Tensor  # (B,) bool: rotations marginalised for this particle


def _best_pose_contributions(
    out: _ChunkResult, space: SearchSpace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best pose of each refined class of a chunk's particles, for
    :meth:`Class2DModel._add_contributions`: classes, angles (degrees), shifts (px) and
    weights (``(B, N)``, ``(B, N, 2)`` for the shifts). Weights are the refined classes'
    posteriors renormalised (the others are negligible by construction); a particle whose
    rotations are marginalised has none (it goes to the buckets instead)."""
    res = out.search
    g_top = out.gamma.gather(1, res.classes)
    g_top = torch.where(g_top >= MIN_WEIGHT * g_top[:, :1], g_top, 0.0)
    g_top = g_top / g_top.sum(1, keepdim=True).clamp(min=1e-30)
    g_top = torch.where(out.broad[:, None], 0.0, g_top)
    return res.classes, space.fine_angles_deg[res.rotation], res.shift, g_top


@dataclass
class _Results:
    """Per-particle results of an iteration, kept on the model's device until the
    iteration's E-step ends and then copied to the host at once (not seven copies per
    chunk): class, ψ, shift x, shift y, max. probability, effective numbers of poses
    and classes, log-likelihood (float32, as the search computes them)."""

    values: torch.Tensor  # (n, 8)
    filled: int = 0

    @classmethod
    def create(cls, n: int, device: torch.device) -> _Results:
        return cls(torch.empty((n, 8), device=device))

    def add(
        self, out: _ChunkResult, space: SearchSpace, ess_class: torch.Tensor, loglik: torch.Tensor
    ) -> None:
        rows = slice(self.filled, self.filled + out.best.shape[0])
        self.filled = rows.stop
        v = self.values[rows]
        v[:, 0] = out.best
        v[:, 1] = space.fine_angles_deg[out.rotation]
        v[:, 2:4] = out.shift
        v[:, 4] = out.max_prob
        v[:, 5] = out.ess_pose
        v[:, 6] = ess_class
        v[:, 7] = loglik

    def store(self, assignments: ParticleAssignments, order: np.ndarray) -> None:
        """Write the rows into ``assignments`` at the particles ``order`` (fill order)."""
        v = self.values.cpu().numpy()
        assignments.best_class[order] = v[:, 0].astype(np.int64)
        assignments.psi_deg[order] = v[:, 1]
        assignments.shift_px[order] = v[:, 2:4]
        assignments.max_prob[order] = v[:, 4]
        assignments.ess_pose[order] = v[:, 5]
        assignments.ess_class[order] = v[:, 6]
        assignments.loglik[order] = v[:, 7]


@dataclass
class _Buckets:
    """M-step sums of a marginalised iteration, per half set, class and coarse rotation,
    in the particle frame: every particle adds ``γ_kr · S_t⁻¹(w·CTF·X)`` to each bucket
    (one batched matrix product per chunk), and each bucket is turned to the class frame
    once per iteration instead of once per contribution."""

    num: torch.Tensor  # (2, K, R, F) complex
    den: torch.Tensor  # (2, K, R, F)

    @classmethod
    def create(cls, k: int, n_rot: int, n_freq: int, device: torch.device) -> _Buckets:
        return cls(
            torch.zeros((2, k, n_rot, n_freq), dtype=torch.complex64, device=device),
            torch.zeros((2, k, n_rot, n_freq), device=device),
        )

    def add(
        self,
        h: int,
        weights: torch.Tensor,
        shifts: torch.Tensor,
        y: torch.Tensor,
        wc2: torch.Tensor,
        phases: PhaseTable,
    ) -> None:
        """Add particles of half set ``h``: ``weights`` ``(B, K, R)`` (class times rotation
        posterior), each class's best shift ``(B, K, 2)`` px, ``y = w·CTF·X`` (complex) and
        ``wc2 = w·CTF²``, ``(B, F)`` on the averaged frequencies, ``phases`` their table."""
        b, k, r = weights.shape
        f = y.shape[-1]
        step = max(1, int(BUCKET_CHUNK_BYTES // (16 * k * f)))  # bounds z below
        for s in range(0, b, step):
            rows = slice(s, s + step)
            z = y[rows, None, :] * phases(shifts[rows])  # (b, K, F): each class's shift
            acc = torch.bmm(
                weights[rows].permute(1, 2, 0),
                torch.view_as_real(z).flatten(-2).transpose(0, 1),
            )
            self.num[h] += torch.view_as_complex(acc.reshape(k, r, f, 2).contiguous())
        self.den[h] += (weights.reshape(b, k * r).T @ wc2).reshape(k, r, f)

    def class_frame(
        self, space: SearchSpace, grid: FourierGrid, keep: torch.Tensor, ctf_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2, K, F)`` sums in the class frame over all kept frequencies (0 outside
        ``keep``): each bucket turned back by its angle."""
        two, k, r, _ = self.num.shape
        f = grid.n
        angles = space.fine_angles_deg[:: space.stride].repeat(two * k)
        num = torch.zeros((two * k, f), dtype=self.num.dtype, device=self.num.device)
        den = torch.zeros((two * k, f), device=self.num.device)
        flat_num = self.num.reshape(two * k * r, -1)
        flat_den = self.den.reshape(two * k * r, -1)
        step = 128  # bounds the oversampled spectra of turned_back
        for s in range(0, flat_num.shape[0], step):
            rows = slice(s, s + step)
            slot = torch.arange(s, min(s + step, flat_num.shape[0]), device=num.device) // r
            full = torch.zeros((slot.numel(), f), dtype=num.dtype, device=num.device)
            full[:, keep] = flat_num[rows]
            num.index_add_(0, slot, back_rotate(full, angles[rows], grid))
            dfull = torch.zeros((slot.numel(), f), device=num.device)
            dfull[:, keep] = flat_den[rows]
            if ctf_mode != "off":  # w alone is the same in every frame
                dfull = rotate_even_spectrum(dfull, angles[rows], grid)
            den.index_add_(0, slot, dfull)
        return num.reshape(two, k, f), den.reshape(two, k, f)


@dataclass
class IterationStats:
    """What the caller needs to report one iteration."""

    counts_hard: np.ndarray
    counts_soft: np.ndarray
    eca: np.ndarray
    n_particles: int
    n_evaluations: float
    timings: dict


class Class2DModel:
    """Class references, noise model, priors and their sufficient statistics."""

    def __init__(self, config: Class2DConfig, params: ResolvedParams, device: torch.device):
        self.config = config
        self.params = params
        self.device = device
        self.grid = FourierGrid.create(params.working_box, device)
        g = self.grid
        apix = params.working_pixel_size_A
        max_r = g.radius_for_resolution(params.max_align_res_A, apix)
        min_r = (
            g.radius_for_resolution(params.min_align_res_A, apix)
            if params.min_align_res_A
            else 0.0
        )
        self.space = SearchSpace.create(
            g,
            params.inplane_step_deg,
            params.max_shift_A / apix,
            min_r,
            max_r,
            config.n_classes,
            device,
        )
        self.align_grid = g.subset(self.space.align_band)
        self._phase_radius = int(math.ceil(params.max_shift_A / apix)) + 2
        self.align_phases = PhaseTable(self.align_grid, self._phase_radius, device)
        self.phases = PhaseTable(g, self._phase_radius, device)
        self._min_align_radius, self._max_align_radius = min_r, max_r
        #: the search uses frequencies up to this radius (cycles per box); see _update_references
        self.current_radius = max_r
        self._band: tuple | None = None  # (radius, space, align grid, phase table) of that band
        self._m_band: tuple | None = None  # (radius, mask, phase table): see marginal_band
        k, f = config.n_classes, g.n
        self.num = torch.zeros((2, k, f), dtype=torch.complex64, device=device)
        self.den = torch.zeros((2, k, f), device=device)
        self.noise = torch.ones(g.n_rings, device=device)
        self.prior = torch.full((k,), 1.0 / k, device=device)
        #: what the particles are aligned to (Wiener filter with the classification prior)
        self.references = torch.zeros((k, g.box, g.box), device=device)
        #: what is shown and written (Wiener filter from the half sets; see _update_references)
        self.averages = torch.zeros((k, g.box, g.box), device=device)
        self.resolution = torch.full((k,), float("inf"), device=device)
        self.frc = torch.zeros((k, g.n_rings), device=device)
        self.tau2 = torch.ones((k, g.n_rings), device=device)
        self.mask = soft_circle(
            g.box,
            0.5 * params.mask_inner_diameter_A / apix,
            0.5 * params.mask_outer_diameter_A / apix,
            device,
        )
        self.support = self.mask > 0
        self.initialised = False
        #: M-steps from E-step assignments since the initialisation (see _search_references)
        self.n_updates = 0
        #: particles the running statistics num/den stand for (see iterate)
        self.statistics_particles = 0
        #: distributed: the processes' collectives; the job sets it (one process: no-ops)
        self.reducer: Reducer = LOCAL
        #: variance (working px², per axis) of the Gaussian prior on the particles' shifts
        #: from their picks (``shift_prior="gaussian"``; see :meth:`_update_shift_prior`)
        self.sigma2_offset_px = self._max_sigma2_offset_px

    # -- state for checkpoints ---------------------------------------------------------
    #: state a checkpoint may lack (written by an earlier version): recomputed on loading
    DERIVED_STATE = frozenset({"averages"})

    def state_dict(self) -> dict:
        return {
            n: getattr(self, n).cpu()
            for n in (
                "num",
                "den",
                "noise",
                "prior",
                "references",
                "averages",
                "resolution",
                "frc",
                "tau2",
            )
        } | {
            "initialised": self.initialised,
            "n_updates": self.n_updates,
            "statistics_particles": self.statistics_particles,
            "current_radius": self.current_radius,
            "sigma2_offset_px": self.sigma2_offset_px,
        }

    def load_state_dict(self, state: dict) -> None:
        for n, v in state.items():
            setattr(self, n, v.to(self.device) if torch.is_tensor(v) else v)
        if "averages" not in state:  # a checkpoint written before the averages were kept
            self.averages = self._shown_averages()

    # -- helpers -----------------------------------------------------------------------
    @property
    def pixel_size_A(self) -> float:
        return self.params.working_pixel_size_A

    @property
    def _max_sigma2_offset_px(self) -> float:
        """The shift prior's widest variance: the search limit at two standard deviations
        (at least one working pixel: with ``max_shift_A = 0`` nothing is shifted)."""
        return max((self.params.max_shift_A / self.pixel_size_A / 2.0) ** 2, 1.0)

    def _log_class_prior(self, final: bool = False) -> torch.Tensor:
        """``(K,)`` log prior of each class in the class posteriors: the learned class
        shares (``class_prior="learned"``, RELION's ``pdf_class``) or 0 for every class
        (``"uniform"``: a class is chosen by its fit alone, whatever its size;
        ``"learned_then_uniform"``: in the ``final`` full iterations only)."""
        prior = self.config.class_prior
        if prior == "uniform" or (prior == "learned_then_uniform" and final):
            return torch.zeros_like(self.prior)
        return torch.log(self.prior.clamp(min=1e-12))

    def _shift_penalty(self, pose_temperature: float) -> float:
        """The shift prior's term per px² in score units (0: uniform within the limit).

        With ``shift_prior="gaussian"`` a Gaussian prior (variance
        :attr:`sigma2_offset_px`) holds the particles near their picks, as RELION's
        ``sigma_offset`` (needed with ``masks_follow_shifts``: without a prior masks and
        shifts drift together, on crowded real particles to the search limit). Scores are
        divided by the pose temperature in the posteriors, so the prior's log enters
        times it.
        """
        if self.params.shift_prior != "gaussian":
            return 0.0
        return pose_temperature / (2.0 * self.sigma2_offset_px)

    def _update_shift_prior(self, shifts_px: np.ndarray, step_size: float) -> None:
        """Blend the batch's best-pose shifts ``(N, 2)`` px into the prior's variance (the
        mean squared shift per axis, as RELION estimates ``sigma2_offset``), between one
        working pixel and :attr:`_max_sigma2_offset_px`."""
        if self.params.shift_prior != "gaussian" or not len(shifts_px):
            return
        batch = float(np.mean(np.square(shifts_px)))  # per axis: the mean of x² and y²
        s2 = (1 - step_size) * self.sigma2_offset_px + step_size * batch
        self.sigma2_offset_px = float(min(max(s2, 1.0), self._max_sigma2_offset_px))

    def _weight(self) -> torch.Tensor:
        """``1/σ²`` per kept coefficient."""
        return 1.0 / self.noise[self.grid.ring].clamp(min=1e-12)

    def _model_ctf(self, ctf: torch.Tensor) -> torch.Tensor:
        """CTF in the likelihood model: CTF (full), sign(CTF) (flip) or 1 (off)."""
        mode = self.config.ctf_correction
        if mode == "off":
            return torch.ones_like(ctf)
        return ctf if mode == "full" else torch.sign(ctf)

    def search_band(self) -> tuple[SearchSpace, FourierGrid, PhaseTable]:
        """Search space, its frequencies and their shift phases at the current radius.

        The alignment band (minimum to maximum alignment resolution) cut at
        :attr:`current_radius`; rebuilt only when the radius changes.
        """
        r = min(self.current_radius, self._max_align_radius)
        if r >= self._max_align_radius:
            return self.space, self.align_grid, self.align_phases
        if self._band is None or self._band[0] != r:
            space = SearchSpace.create(
                self.grid,
                self.params.inplane_step_deg,
                self.params.max_shift_A / self.pixel_size_A,
                self._min_align_radius,
                r,
                self.config.n_classes,
                self.device,
            )
            grid = self.grid.subset(space.align_band)
            self._band = (r, space, grid, PhaseTable(grid, self._phase_radius, self.device))
        return self._band[1:]

    def marginal_band(self) -> tuple[torch.Tensor, PhaseTable]:
        """Frequencies a marginalised iteration averages (``|f|`` up to the current radius,
        as RELION's current image size) and their shift phases: ``(F,)`` bool mask and
        table. Beyond the radius the classes keep no data from such an iteration."""
        r = min(self.current_radius, self._max_align_radius)
        if self._m_band is None or self._m_band[0] != r:
            keep = self.grid.radius <= r
            table = PhaseTable(self.grid.subset(keep), self._phase_radius, self.device)
            self._m_band = (r, keep, table)
        return self._m_band[1:]

    def _chunk(self, pool: ParticlePool, space: SearchSpace) -> int:
        """Particles per E-step chunk: within the memory budget and small enough that the
        temporaries (a few MB each) are reused by the allocator instead of page-faulted in."""
        k, f = self.config.n_classes, int(space.align_band.sum())
        t = space.coarse_shifts.shape[0]
        n1, n, j = space.n_candidates, space.n_refine, space.refine_offsets.numel()
        fp = int(space.pose_in_align.sum()) * max(space.n_coarse_poses, j, 9)
        per_particle = (
            8 * f * (4 + 3 * n1 + 2 * n * (j + 9)) + 8 * 3 * fp * n1 + 8 * k * t * space.n_coarse
        )
        fits = pool.chunk_size_for(per_particle, self.config.memory_budget_GB)
        if self.device.type == "cpu":
            # temporaries of a few tens of MB are reused by the allocator, larger ones
            # are page-faulted in afresh on every chunk
            return max(1, min(fits, max(16, int(48e6 // per_particle))))
        return fits

    # -- initialisation ----------------------------------------------------------------
    def initialise(
        self, pool: ParticlePool, indices: np.ndarray, rng: np.random.Generator
    ) -> None:
        """Classes that start as smooth blobs, as RELION starts a 2D job without references.

        * noise: the particles' mean ring power minus the ring power of their mean;
        * every particle of ``indices`` joins a random class at a random in-plane angle
          (its poses against the common, nearly round average of the data are all
          alike), so every class is a blob, slightly different from the others by its
          random members;
        * the signal prior is the power of that common average, and the search starts
          at the resolution where the blobs' spectral SNR drops below 1.

        Classes then diverge from blobs as the first iterations align the particles to
        them, instead of each starting from one subset's noise, which alignment by the
        best pose would reproduce ("Einstein from noise").
        """
        k, g = self.config.n_classes, self.grid
        n = len(indices)
        order = rng.permutation(n)
        cls_of = np.empty(n, np.int64)
        cls_of[order] = np.arange(n) % k
        power = torch.zeros(g.n_rings, device=self.device)
        total = torch.zeros(g.n, dtype=torch.complex64, device=self.device)
        mine = self.reducer.mine(indices)  # distributed: this process's particles
        for s in range(0, len(mine), 1024):
            x = pool.get(mine[s : s + 1024], self.device)[0]
            power += g.ring_average(x.abs() ** 2).sum(0)
            total += x.sum(0)
        power, total = self.reducer.sum(power, total)  # distributed: over all processes
        mean_power = power / n
        noise = mean_power - g.ring_average((total / n).abs() ** 2)
        self.noise = torch.maximum(noise, 0.01 * mean_power).clamp(min=1e-12)
        self.noise[0] = self.noise[1]
        # a random in-plane angle per particle draws its marginal over rotations against
        # the round average; unlike the exact rotational average it leaves each class a
        # little asymmetric (which the prior below keeps to low resolution), so the classes
        # start to differ at once instead of staying round for many iterations
        angles = torch.from_numpy(rng.uniform(0.0, 360.0, (n, 1))).float()
        self.num, self.den = self._accumulate(
            pool,
            indices,
            torch.from_numpy(cls_of)[:, None],
            angles,
            torch.zeros((n, 1, 2)),
            torch.ones((n, 1)),
        )
        rnum = g.ring_average(self.num).real[..., g.ring].to(self.num.dtype)
        rden = g.ring_average(self.den)[..., g.ring]
        common = rnum.sum((0, 1)) / (rden.sum((0, 1)) + 1e-30)
        self.references = (g.inverse(common) * self.mask).expand(k, -1, -1).clone()
        self._update_references()
        self.initialised = True
        self.n_updates = 0
        self.statistics_particles = n

    # -- one iteration -----------------------------------------------------------------
    def iterate(
        self,
        pool: ParticlePool,
        indices: np.ndarray,
        assignments: ParticleAssignments,
        annealing: float,
        step_size: float,
        hard: bool,
        online: bool,
        rng: np.random.Generator,
        rescale: bool = True,
        final: bool = False,
    ) -> IterationStats:
        """One EM iteration over the particles at ``indices``; updates ``assignments``.

        The new statistics are blended into the running ones with ``step_size``, after
        the running ones are scaled to as many particles as this batch (``rescale``;
        off for an update that adds new particles' statistics to all the others).
        ``final``: one of the job's final full iterations (see ``class_prior``).

        Each particle is searched coarse to fine (:func:`search`). Where its rotation
        posterior is sharp it keeps its best pose in its best classes; where it is broad
        (blob-like classes early on, junk, particles that fit no class) its classes are
        scored and averaged with the in-plane rotations of the coarse pass marginalised
        (:meth:`_posteriors`), as RELION's expectation does, so its noise is not aligned.
        """
        t0 = time.perf_counter()
        cfg = self.config
        k = cfg.n_classes
        # the masked particles' coefficients are correlated: only a fraction of them are
        # independent measurements (see independent_fraction)
        pose_temperature = 1.0 / pool.independent_fraction
        # the initial classification uncertainty (ICUF, annealed) softens the class
        # posteriors only: poses are weighed with the measured noise from the start
        class_temperature = annealing * pose_temperature
        space, align_grid, align_phases = self.search_band()
        keep, keep_phases = self.marginal_band()
        weight = self._weight()
        w_align = weight * space.align_band
        band = space.align_index  # (positions, not a mask: no GPU sync per chunk)
        log_prior = self._log_class_prior(final)
        shift_penalty = self._shift_penalty(pose_temperature)
        chunk = self._chunk(pool, space)
        n = len(indices)
        mine = self.reducer.mine(indices)  # distributed: this process's share of the batch
        num = torch.zeros((2, k, self.grid.n), dtype=torch.complex64, device=self.device)
        den = torch.zeros((2, k, self.grid.n), device=self.device)
        buckets = _Buckets.create(k, space.n_coarse, int(keep.sum()), self.device)
        keep_at = torch.nonzero(keep).flatten()  # (positions, not a mask: no GPU sync per chunk)
        results = _Results.create(len(mine), self.device)
        counts_soft = torch.zeros(k, device=self.device)
        ess_sum = torch.zeros(k, device=self.device)
        noise_sum = torch.zeros(self.grid.n_rings, device=self.device)
        pmax_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_broad = 0
        t_search = t_table = 0.0
        # each half set is aligned against the other half's references (see class docs)
        half = pool.half[mine]
        order = np.concatenate([mine[half == h] for h in (0, 1)])
        search_refs = self._search_references()
        has_bfactor = pool.has_bfactor
        for h in (0, 1):
            members = mine[half == h]
            if not len(members):
                continue
            tt = time.perf_counter()
            table = rotated_coefficients(search_refs[h], space.fine_angles_deg, align_grid)
            tables = SearchTables.build(table, space, align_phases)
            t_table += time.perf_counter() - tt
            for s in range(0, len(members), chunk):
                idx = members[s : s + chunk]
                # masked around each particle's centre as the last iteration found it
                x, ctf_vals, params = pool.get(idx, self.device, assignments.shift_px[idx])
                ctf = self._model_ctf(ctf_vals)
                ts = time.perf_counter()
                res = search(
                    x,
                    ctf,
                    w_align,
                    tables,
                    space,
                    self.grid,
                    cfg.force_max_over_poses,
                    pose_temperature,
                    align_phases,
                    shift_penalty=shift_penalty,
                )
                out = self._posteriors(res, log_prior, class_temperature, pose_temperature)
                t_search += time.perf_counter() - ts
                ess_class = 1.0 / (out.gamma**2).sum(1)
                ess_sum.index_add_(0, out.best, ess_class)
                if hard:
                    out.gamma = torch.nn.functional.one_hot(out.best, k).float()
                # the M-step's sums, while the chunk is held (memory flat in the batch size;
                # the positions of its positive weights are this chunk's second GPU sync)
                self._add_contributions(
                    num,
                    den,
                    x,
                    ctf_vals,
                    params,
                    torch.full((len(idx),), h, device=self.device),
                    *_best_pose_contributions(out, space),
                    bfactor=has_bfactor,
                )
                # the broad particles as positions: one GPU sync per chunk, not one per mask
                broad = torch.nonzero(out.broad).flatten()
                if broad.numel():
                    m = res.marginal
                    y, wc2 = self._data_terms(
                        x[broad][:, keep_at], ctf_vals[broad][:, keep_at], keep_at
                    )
                    w = out.gamma[broad][:, :, None] * m.rotation_posterior[broad]
                    buckets.add(h, w, m.shift[broad], y, wc2, keep_phases)
                    n_broad += broad.numel()
                counts_soft += out.gamma.sum(0)
                pmax_sum += out.max_prob.sum()
                const = -(w_align * x.abs() ** 2).sum(1)
                results.add(out, space, ess_class, out.loglik + const)
                # noise: residual power at the best class and pose
                tmpl = table.reshape(k * space.n_fine, -1)[out.best * space.n_fine + out.rotation]
                model = ctf[:, band] * tmpl * align_phases(out.shift).conj()
                noise_sum += align_grid.ring_average((x[:, band] - model).abs() ** 2).sum(0)
            del table, tables
        results.store(assignments, order)
        t_e = time.perf_counter() - t0
        # distributed: the E-step's sums and per-particle results over all processes
        broad_count = torch.tensor(float(n_broad), dtype=torch.float64, device=self.device)
        counts_soft, ess_sum, noise_sum, pmax_sum, broad_count = self.reducer.sum(
            counts_soft, ess_sum, noise_sum, pmax_sum, broad_count
        )
        self.reducer.share_assignments(assignments, indices)
        pmax_sum, n_broad = float(pmax_sum), int(broad_count)
        counts_hard = np.bincount(assignments.best_class[indices], minlength=k)
        num, den = self.reducer.sum(num, den)  # distributed: over all processes
        if n_broad:
            num_b, den_b = buckets.class_frame(space, self.grid, keep, cfg.ctf_correction)
            num_b, den_b = self.reducer.sum(num_b, den_b)  # distributed: over all processes
            num, den = num + num_b, den + den_b
        eta = step_size
        # the running statistics stand for `statistics_particles` particles: put them in
        # the units of this batch before blending (a full pass after mini-batches)
        scale = n / self.statistics_particles if rescale and self.statistics_particles else 1.0
        self.num = (1 - eta) * scale * self.num + eta * num
        self.den = (1 - eta) * scale * self.den + eta * den
        self.statistics_particles = n if rescale else max(self.statistics_particles, n)
        # rings outside the alignment band keep their estimate
        in_band = torch.bincount(align_grid.ring, minlength=self.grid.n_rings) > 0
        batch_noise = torch.where(in_band, noise_sum / n, self.noise)
        if cfg.white_noise:
            batch_noise = torch.full_like(batch_noise, float((batch_noise[self.grid.ring]).mean()))
        self.noise = ((1 - eta) * self.noise + eta * batch_noise).clamp(min=1e-12)
        self._update_shift_prior(assignments.shift_px[indices], eta)
        soft = counts_soft / n
        self.prior = ((1 - eta) * self.prior + eta * soft).clamp(min=1e-8)
        self.prior = self.prior / self.prior.sum()
        if online and cfg.reseed_empty_classes:
            self._reseed(pool, indices, assignments, counts_soft, rng)
        self._update_references()
        self.n_updates += 1
        t_m = time.perf_counter() - t0 - t_e
        evals = n * (
            k * space.n_coarse * space.coarse_shifts.shape[0]
            # pose band: P coarse poses, J rotations, 9 shifts; then the full band once
            + space.n_candidates * (space.n_coarse_poses + space.refine_offsets.numel() + 9 + 1)
            + space.n_refine * (9 + 4)  # polish: 0.5-px shifts, ±2 fine rotations
        )
        eca = (ess_sum / torch.as_tensor(counts_hard, device=self.device).clamp(min=1)).cpu()
        return IterationStats(
            counts_hard=counts_hard,
            counts_soft=counts_soft.cpu().numpy(),
            eca=eca.numpy(),
            n_particles=n,
            n_evaluations=float(evals),
            timings={
                "references_s": t_table,
                "search_s": t_search,
                "e_step_s": t_e,
                "m_step_s": t_m,
                "evaluations_per_s": evals / max(t_search, 1e-9),
                "marginalised_fraction": n_broad / max(n, 1),
                "mean_max_probability": pmax_sum / max(n, 1),
                "search_radius": float(min(self.current_radius, self._max_align_radius)),
            },
        )

    def _posteriors(
        self,
        res: SearchResult,
        log_prior: torch.Tensor,
        class_temperature: float,
        pose_temperature: float,
    ) -> _ChunkResult:
        """Class posteriors and each particle's best class and pose, from its best poses
        where its rotation posterior is sharp and with rotations marginalised where it is
        broad (less than :data:`SHARP_POSTERIOR` within one coarse step of the best)."""
        m = res.marginal
        g_marg = torch.softmax(log_prior + m.class_loglik / class_temperature, 1)
        best_m = g_marg.argmax(1)
        post = m.rotation_posterior.gather(
            1, best_m[:, None, None].expand(-1, 1, m.rotation_posterior.shape[-1])
        )[:, 0]
        n_rot = post.shape[-1]
        # (made on the device: a torch.tensor of a list would be copied to a GPU every chunk)
        near = post.argmax(-1, keepdim=True) + torch.arange(-1, 2, device=post.device)
        broad = post.gather(1, near % n_rot).sum(1) < SHARP_POSTERIOR
        # the best poses of the refined classes
        g_hard = torch.softmax(log_prior + res.class_loglik / class_temperature, 1)
        best_h = g_hard.argmax(1)
        pos = (res.classes == best_h[:, None]).float().argmax(1)
        ps = res.pose_scores.gather(
            1, pos[:, None, None].expand(-1, 1, res.pose_scores.shape[-1])
        )[:, 0]
        p_pose = torch.softmax(ps / pose_temperature, -1)

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            mask = broad.reshape((-1,) + (1,) * (a.dim() - 1))
            return torch.where(mask, a, b)

        return _ChunkResult(
            gamma=pick(g_marg, g_hard),
            best=pick(best_m, best_h),
            rotation=pick(
                m.rotation.gather(1, best_m[:, None])[:, 0],
                res.rotation.gather(1, pos[:, None])[:, 0],
            ),
            shift=pick(
                m.shift.gather(1, best_m[:, None, None].expand(-1, 1, 2))[:, 0],
                res.shift.gather(1, pos[:, None, None].expand(-1, 1, 2))[:, 0],
            ),
            max_prob=pick(
                g_marg.max(1).values * post.max(-1).values,
                g_hard.max(1).values * p_pose.max(-1).values,
            ),
            ess_pose=pick(1.0 / (post**2).sum(-1), 1.0 / (p_pose**2).sum(-1)),
            loglik=pick(
                m.class_loglik.gather(1, best_m[:, None])[:, 0],
                res.class_loglik.gather(1, best_h[:, None])[:, 0],
            ),
            search=res,
            broad=broad,
        )

    def _data_terms(
        self, x: torch.Tensor, ctf_vals: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's M-step terms in the particle frame on the frequencies ``keep``:
        ``w·CTF·X`` and ``w·CTF²`` (``|CTF|`` for phase flipping, 1 without CTF correction)."""
        weight = self._weight()[keep]
        mode = self.config.ctf_correction
        if mode == "off":
            return weight * x, weight.expand(x.shape[0], -1)
        c2 = ctf_vals * ctf_vals if mode == "full" else ctf_vals.abs()
        return weight * ctf_vals * x, weight * c2

    # -- M-step ------------------------------------------------------------------------
    def _accumulate(
        self,
        pool: ParticlePool,
        indices: np.ndarray,
        classes: torch.Tensor,
        angles_deg: torch.Tensor,
        shifts: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sufficient statistics of the given contributions, per half set.

        ``classes, angles_deg, weights``: ``(n, N)``; ``shifts``: ``(n, N, 2)`` px.
        Only contributions with a positive weight are back-rotated. In a distributed job
        every process calls it, with the same particles or each with its own, and gets
        the sums over all of them. (An iteration's E-step adds each chunk's own
        contributions with :meth:`_add_contributions` while it holds the chunk.)
        """
        k, g = self.config.n_classes, self.grid
        num = torch.zeros((2, k, g.n), dtype=torch.complex64, device=self.device)
        den = torch.zeros((2, k, g.n), device=self.device)
        if self.reducer.world_size > 1:  # distributed: only this process's particles
            held = torch.from_numpy(self.reducer.owns(indices)).to(weights.device)
            weights = torch.where(held[:, None], weights, 0.0)
        held_rows = np.nonzero((weights > 0).any(1).cpu().numpy())[0]
        step = 1024
        for s in range(0, len(held_rows), step):
            rows = held_rows[s : s + step]
            at = torch.from_numpy(rows)  # (the contributions may be on the host)
            # masked around the first contribution's shift (the particle's current centre)
            x, ctf_vals, params = pool.get(indices[rows], self.device, shifts[at, 0])
            self._add_contributions(
                num,
                den,
                x,
                ctf_vals,
                params,
                torch.from_numpy(pool.half[indices[rows]]).to(self.device),
                *(t[at].to(self.device) for t in (classes, angles_deg, shifts, weights)),
                pool.has_bfactor,
            )
        return self.reducer.sum(num, den)  # distributed: over all processes

    def _add_contributions(
        self,
        num: torch.Tensor,
        den: torch.Tensor,
        x: torch.Tensor,
        ctf_vals: torch.Tensor,
        params: torch.Tensor,
        half: torch.Tensor,
        classes: torch.Tensor,
        angles_deg: torch.Tensor,
        shifts: torch.Tensor,
        weights: torch.Tensor,
        bfactor: bool | None = None,
    ) -> None:
        """Add one chunk of particles to the sums ``num, den`` ``(2, K, F)`` in place.

        ``x, ctf_vals, params``: the chunk's particles as :meth:`ParticlePool.get` gives
        them; ``half`` ``(B,)`` their half sets; ``classes, angles_deg, weights`` ``(B, N)``
        and ``shifts`` ``(B, N, 2)`` px: each particle's contributions. Only those with a
        positive weight are back-rotated, a bounded number at a time. ``bfactor``: whether
        any particle has a CTF B-factor (:attr:`ParticlePool.has_bfactor`).
        """
        k, g = self.config.n_classes, self.grid
        weight = self._weight()
        mode = self.config.ctf_correction
        rows, cols = torch.nonzero(weights > 0, as_tuple=True)
        kk = classes[rows, cols]
        angles = angles_deg[rows, cols]
        w_all = weights[rows, cols]
        sh_all = shifts[rows, cols]
        slots = half[rows].long() * k + kk
        # contributions back-rotated at once: oversampled spectra within the memory budget
        chunk = max(1, min(4096, int(self.config.memory_budget_GB * 2**30 / (64 * g.box**2))))
        if self.device.type == "cpu":
            chunk = min(chunk, 128)
        for s in range(0, rows.shape[0], chunk):
            sel = slice(s, s + chunk)
            r = rows[sel]
            angle, w = angles[sel], w_all[sel]
            data_ctf = torch.ones_like(ctf_vals[r]) if mode == "off" else ctf_vals[r]
            vals = (w[:, None] * weight) * data_ctf * x[r] * self.phases(sh_all[sel])
            vals = back_rotate(vals, angle, g)
            dens = (w[:, None] * weight) * rotated_ctf_weight(
                params[r], angle, g, self.pixel_size_A, mode, bfactor
            )
            num.view(2 * k, -1).index_add_(0, slots[sel], vals)
            den.view(2 * k, -1).index_add_(0, slots[sel], dens)

    def _reseed(
        self,
        pool: ParticlePool,
        indices: np.ndarray,
        assignments: ParticleAssignments,
        counts_soft: torch.Tensor,
        rng: np.random.Generator,
    ) -> None:
        """Refill emptied classes by splitting the most populated class of this batch.

        The donor's members, aligned by their current poses, are split in two along
        their first principal component (:meth:`_split`): the donor keeps one part and
        the emptied class takes the other, so a class that merged two views gives one to
        each. Each part's statistics replace the classes' own, with the donor's weight
        shared in proportion to the parts' sizes.
        """
        k = self.config.n_classes
        best = assignments.best_class[indices]
        counts = np.bincount(best, minlength=k).astype(float)
        # emptied: few particles have it as their best class (while posteriors are broad
        # a class can keep soft weight without being any particle's class)
        mean = len(indices) / k
        soft = counts_soft.cpu().numpy()
        empty = np.nonzero(np.minimum(counts, soft) < EMPTY_FRACTION * mean)[0]
        if not len(empty):
            return
        counts[empty] = 0  # an emptied class is never a donor
        # a few per iteration, the emptiest first: each split costs a pass over its donor
        empty = empty[np.argsort(soft[empty], kind="stable")][: max(1, -(-k // MAX_RESEED_SHARE))]
        for e in empty.tolist():  # loop over emptied classes (a handful), not particles
            donor = int(np.argmax(counts))
            members = indices[best == donor]
            if len(members) < 4:
                return
            second = self._split(pool, members, assignments)
            groups = torch.from_numpy(np.where(second, e, donor))[:, None]
            num, den = self._accumulate(
                pool,
                members,
                groups,
                torch.from_numpy(assignments.psi_deg[members]).float()[:, None],
                torch.from_numpy(assignments.shift_px[members]).float()[:, None, :],
                torch.ones((len(members), 1)),
            )
            total = float(self.den[:, donor].sum())
            scale = total / float(den[:, [donor, e]].sum().clamp(min=1e-30))
            for c in (donor, e):
                self.num[:, c] = num[:, c] * scale
                self.den[:, c] = den[:, c] * scale
            # the new class's signal prior starts from its donor's average
            self.references[e] = self.references[donor]
            share = float(second.mean())
            self.prior[e] = float(self.prior[donor]) * share
            self.prior[donor] = float(self.prior[donor]) * (1 - share)
            counts[donor] *= 1 - share
            best = np.where(np.isin(indices, members[second]), e, best)
        self.prior = self.prior / self.prior.sum()

    def _split(
        self, pool: ParticlePool, members: np.ndarray, assignments: ParticleAssignments
    ) -> np.ndarray:
        """Which of a class's members go to a new class: ``(M,)`` bool.

        The members' CTF-weighted coefficients, turned to the class frame by their
        poses, over the low half of the search band, are projected on their first
        principal component; the side of the median splits them. A class holding two
        views splits along the difference between the views; a homogeneous class
        splits along its noise, as a random split would.
        """
        radius = 0.5 * min(self.current_radius, self._max_align_radius)
        keep = self.grid.band(0.5, max(radius, 4.0))
        weight = self._weight()

        # aligned, whitened low-band coefficients (real), in chunks of 128. distributed:
        # each process fills the rows of the members it holds and the sum gathers them
        # (members come from one mini-batch, so they fit at once)
        data = torch.zeros((len(members), 2 * int(keep.sum())), device=self.device)
        for s in range(0, len(members), 128):
            part = np.arange(s, min(s + 128, len(members)))
            part = part[self.reducer.owns(members[part])]
            if not len(part):
                continue
            idx = members[part]
            sh = torch.from_numpy(assignments.shift_px[idx]).float().to(self.device)
            x, ctf_vals, _ = pool.get(idx, self.device, sh)
            y, _ = self._data_terms(x, ctf_vals, torch.ones_like(weight, dtype=torch.bool))
            ang = torch.from_numpy(assignments.psi_deg[idx]).float().to(self.device)
            aligned = back_rotate(y * self.phases(sh), ang, self.grid)[:, keep]
            row = torch.view_as_real(aligned / weight[keep].sqrt()).flatten(1)
            data[torch.from_numpy(part).to(self.device)] = row
        (data,) = self.reducer.sum(data)
        data = data - data.mean(0)
        # the component is found on at most SPLIT_SAMPLE members (every member is projected)
        sample = data[:: max(1, len(members) // SPLIT_SAMPLE)]
        # first principal component by a few power iterations (members x frequencies)
        v = sample[0] + 1e-6
        for _ in range(20):
            v = sample.T @ (sample @ v)
            v = v / v.norm().clamp(min=1e-30)
        proj = (data @ v).cpu().numpy()
        return proj > np.median(proj)

    def _search_references(self) -> torch.Tensor:
        """``(2, K, D, D)``: the references the particles of half set ``h`` are aligned to.

        Half ``h`` is scored against the average of the *other* half (its own Wiener
        filter, mask and clamp-solvent), so no particle is compared with an average
        that holds its own noise. Without this a small class fits its members' noise
        better than the right view's class fits their signal, and stays together as a
        mixed, self-sustaining class. The initial references are nearly featureless
        (random subsets at random rotations), and each half would break their
        rotational symmetry its own way; so the first :data:`CROSS_HALF_START`
        iterations align both halves to the full averages, which gives the two halves'
        classes the same orientation, and aligning each half to the other keeps it.
        """
        if self.n_updates < CROSS_HALF_START:
            return self.references[None].expand(2, -1, -1, -1)
        g, k = self.grid, self.config.n_classes
        avg, inv_tau2 = regularised_average(self.num, self.den, self.tau2, g)
        images = g.inverse(avg) * self.mask
        if self.config.clamp_solvent:
            images = clamp_solvent(
                self.num.reshape(2 * k, -1),
                self.den.reshape(2 * k, -1),
                inv_tau2.expand(2, -1, -1).reshape(2 * k, -1),
                self.support,
                g,
                images.reshape(2 * k, g.box, g.box),
            ).reshape(2, k, g.box, g.box)
        return images.flip(0)

    def _update_references(self) -> None:
        """Regularised averages, mask or clamp-solvent, re-centring, FRC resolution, and
        the search radius for the next iteration.

        The signal prior comes from the previous averages (:func:`signal_prior`), so a
        class gains resolution only as far as its data support it; the next E-step
        searches up to where the best class's spectral SNR still reaches 1, plus
        ``resolution_increment_px`` shells (RELION's current image size).
        """
        cfg, g = self.config, self.grid
        total_den = self.den.sum(0)
        tau2, frc = signal_prior(
            self.num,
            self.den,
            g,
            cfg.regularisation_factor,
            class_power(self.references, g),
            falling=cfg.ctf_correction == "off",
        )
        avg, inv_tau2 = regularised_average(self.num.sum(0), total_den, tau2, g)
        images = self._masked_images(avg, inv_tau2)
        if cfg.recenter:
            shift = centre_of_mass_shift(images, cfg.recenter_threshold, cfg.recenter_binary)
            shift = torch.where(shift.norm(dim=-1, keepdim=True) > 0.5, shift, 0.0)
            if bool((shift != 0).any()):
                phase = g.shift_phase(shift, -1.0)
                self.num = self.num * phase[None]
                images = self._masked_images(avg * phase, inv_tau2)
        self.frc = frc
        self.tau2 = tau2
        self.resolution = resolution_from_frc(frc, g, self.pixel_size_A)
        self.references = images
        self.averages = self._shown_averages()
        populated = self.prior > EMPTY_FRACTION / cfg.n_classes
        # the round part common to all particles carries no angle: only the rest counts
        dvp = cfg.regularisation_factor * orientable_ssnr(self.num, self.den, g)
        self.current_radius = current_radius(
            dvp,
            populated,
            cfg.resolution_increment_px,
            self._max_align_radius,
        )

    def _masked_images(self, avg: torch.Tensor, inv_tau2: torch.Tensor) -> torch.Tensor:
        """``(K, D, D)`` images of the class averages ``avg`` (coefficients, Wiener-filtered
        with ``inv_tau2``): masked, or with ``clamp_solvent`` solved with zero density
        outside the mask from the current statistics."""
        g = self.grid
        images = g.inverse(avg) * self.mask
        if self.config.clamp_solvent:
            images = clamp_solvent(
                self.num.sum(0), self.den.sum(0), inv_tau2, self.support, g, images
            )
        return images

    def _shown_averages(self) -> torch.Tensor:
        """``(K, D, D)`` the averages shown and written: the statistics Wiener-filtered by
        the signal the half sets measure (:func:`half_set_signal`), without the
        classification prior the references get, then masked (or clamp-solvent)."""
        cfg = self.config
        tau2, _ = half_set_signal(
            self.num,
            self.den,
            self.grid,
            cfg.regularisation_factor,
            falling=cfg.ctf_correction == "off",
        )
        avg, inv_tau2 = regularised_average(self.num.sum(0), self.den.sum(0), tau2, self.grid)
        return self._masked_images(avg, inv_tau2)

    # -- reporting ---------------------------------------------------------------------
    def class_averages(self) -> np.ndarray:
        """``(K, D, D)`` the class averages shown and written (:attr:`averages`)."""
        return self.averages.detach().cpu().numpy().astype(np.float32)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> first CUDA device when present, else CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA device is available")
    return dev
