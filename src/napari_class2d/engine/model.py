"""The classifier state and one EM iteration (E-step over particles, M-step).

Sufficient statistics are kept per half set (for FRC resolution) in the class
frame: ``num[h, k, f] = Σ γ R⁻¹S⁻¹(w·CTF·X)`` and ``den[h, k, f] = Σ γ R⁻¹(w·CTF²)``.
Online EM blends each mini-batch's statistics into the running ones with step
size η: ``S ← (1 - η) S + η S_batch`` (η = 1 for the first online iteration
and every full iteration, :data:`ONLINE_STEP_SIZE` afterwards), so the running
statistics stay in "one mini-batch" units and old, worse alignments fade.
The E-step aligns each half set to the other half's averages
(:meth:`Class2DModel._search_references`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from napari_class2d.engine.config import Class2DConfig, ResolvedParams
from napari_class2d.engine.fourier import FourierGrid, rotated_coefficients, soft_circle
from napari_class2d.engine.pool import ParticlePool
from napari_class2d.engine.reconstruct import (
    back_rotate,
    centre_of_mass_shift,
    clamp_solvent,
    half_set_wiener,
    resolution_from_frc,
    rotated_ctf_weight,
    wiener,
)
from napari_class2d.engine.search import PhaseTable, SearchSpace, SearchTables, search

#: step size of online-EM iterations after the first (documented in docs/parameters.md)
ONLINE_STEP_SIZE = 0.5
#: posteriors below this (relative to the particle's best class) do not enter the M-step
MIN_WEIGHT = 0.01
#: iterations aligned to the full averages before each half set is aligned to the other's
CROSS_HALF_START = 3
#: a class whose soft count falls below this fraction of the mean is "emptied"
EMPTY_FRACTION = 0.05


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
        radius = int(math.ceil(params.max_shift_A / apix)) + 2
        self.align_phases = PhaseTable(self.align_grid, radius, device)
        self.phases = PhaseTable(g, radius, device)
        k, f = config.n_classes, g.n
        self.num = torch.zeros((2, k, f), dtype=torch.complex64, device=device)
        self.den = torch.zeros((2, k, f), device=device)
        self.noise = torch.ones(g.n_rings, device=device)
        self.prior = torch.full((k,), 1.0 / k, device=device)
        self.references = torch.zeros((k, g.box, g.box), device=device)
        self.resolution = torch.full((k,), float("inf"), device=device)
        self.frc = torch.zeros((k, g.n_rings), device=device)
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

    # -- state for checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            n: getattr(self, n).cpu()
            for n in ("num", "den", "noise", "prior", "references", "resolution", "frc")
        } | {"initialised": self.initialised, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state.items():
            setattr(self, n, v.to(self.device) if torch.is_tensor(v) else v)

    # -- helpers -----------------------------------------------------------------------
    @property
    def pixel_size_A(self) -> float:
        return self.params.working_pixel_size_A

    def _weight(self) -> torch.Tensor:
        """``1/σ²`` per kept coefficient."""
        return 1.0 / self.noise[self.grid.ring].clamp(min=1e-12)

    def _model_ctf(self, ctf: torch.Tensor) -> torch.Tensor:
        """CTF in the likelihood model: CTF (full), sign(CTF) (flip) or 1 (off)."""
        mode = self.config.ctf_correction
        if mode == "off":
            return torch.ones_like(ctf)
        return ctf if mode == "full" else torch.sign(ctf)

    def _chunk(self, pool: ParticlePool) -> int:
        """Particles per E-step chunk: within the memory budget and small enough that the
        temporaries (a few MB each) are reused by the allocator instead of page-faulted in."""
        k, f = self.config.n_classes, int(self.space.align_band.sum())
        t = self.space.coarse_shifts.shape[0]
        n1, n, j = self.space.n_candidates, self.space.n_refine, self.space.refine_offsets.numel()
        fp = int(self.space.pose_in_align.sum()) * max(self.space.n_coarse_poses, j, 9)
        per_particle = (
            8 * f * (4 + 3 * n1 + 2 * n * (j + 9))
            + 8 * 3 * fp * n1
            + 8 * k * t * self.space.n_coarse
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
        """References from averages of random particle subsets at random rotations."""
        k = self.config.n_classes
        order = rng.permutation(len(indices))
        classes = np.arange(len(indices)) % k
        cls_of = np.empty(len(indices), np.int64)
        cls_of[order] = classes
        rot = rng.integers(0, self.space.n_fine, len(indices))
        # initial noise: ring power of the particles themselves (signal + noise)
        power = torch.zeros(self.grid.n_rings, device=self.device)
        for s in range(0, len(indices), 1024):
            x = pool.get(indices[s : s + 1024], self.device)[0]
            power += self.grid.ring_average(x.abs() ** 2).sum(0)
        self.noise = (power / len(indices)).clamp(min=1e-12)
        self.noise[0] = self.noise[1]
        num, den = self._accumulate(
            pool,
            indices,
            torch.from_numpy(cls_of)[:, None],
            torch.from_numpy(rot)[:, None],
            torch.zeros((len(indices), 1, 2)),
            torch.ones((len(indices), 1)),
        )
        self.num, self.den = num, den
        self._update_references()
        self.initialised = True
        self.n_updates = 0

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
    ) -> IterationStats:
        """One EM iteration over the particles at ``indices``; updates ``assignments``."""
        t0 = time.perf_counter()
        cfg = self.config
        k = cfg.n_classes
        band = self.space.align_band
        weight = self._weight()
        w_align = weight * band
        log_prior = torch.log(self.prior.clamp(min=1e-12))
        chunk = self._chunk(pool)
        n = len(indices)
        # contributions of every particle, filled chunk by chunk (allocated once: small
        # long-lived tensors between the chunks' large temporaries fragment the heap)
        m = self.space.n_refine
        contrib_cls = torch.empty((n, m), dtype=torch.long)
        contrib_rot = torch.empty((n, m), dtype=torch.long)
        contrib_shift = torch.empty((n, m, 2))
        contrib_w = torch.empty((n, m))
        filled = 0
        counts_soft = torch.zeros(k, device=self.device)
        ess_sum = torch.zeros(k, device=self.device)
        noise_sum = torch.zeros(self.grid.n_rings, device=self.device)
        t_search = t_table = 0.0
        # each half set is aligned against the other half's references (see class docs)
        half = pool.half[indices]
        order = np.concatenate([indices[half == h] for h in (0, 1)])
        search_refs = self._search_references()
        for h in (0, 1):
            members = indices[half == h]
            if not len(members):
                continue
            tt = time.perf_counter()
            table = rotated_coefficients(
                search_refs[h], self.space.fine_angles_deg, self.align_grid
            )
            tables = SearchTables.build(table, self.space, self.align_phases)
            t_table += time.perf_counter() - tt
            for s in range(0, len(members), chunk):
                idx = members[s : s + chunk]
                x, ctf_vals, _ = pool.get(idx, self.device)
                ctf = self._model_ctf(ctf_vals)
                ts = time.perf_counter()
                res = search(
                    x,
                    ctf,
                    w_align,
                    tables,
                    self.space,
                    self.grid,
                    cfg.force_max_over_poses,
                    annealing,
                    self.align_phases,
                )
                t_search += time.perf_counter() - ts
                logp = log_prior + res.class_loglik / annealing
                gamma = torch.softmax(logp, 1)  # (B, K)
                best = gamma.argmax(1)
                ess_class = 1.0 / (gamma**2).sum(1)
                if hard:
                    gamma = torch.nn.functional.one_hot(best, k).float()
                # posterior of the refined classes only (others are negligible by construction)
                g_top = gamma.gather(1, res.classes)
                g_top = torch.where(g_top >= MIN_WEIGHT * g_top[:, :1], g_top, 0.0)
                g_top = g_top / g_top.sum(1, keepdim=True).clamp(min=1e-30)
                counts_soft += gamma.sum(0)
                ess_sum.index_add_(0, best, ess_class)
                rows = slice(filled, filled + len(idx))
                filled += len(idx)
                contrib_cls[rows] = res.classes.cpu()
                contrib_rot[rows] = res.rotation.cpu()
                contrib_shift[rows] = res.shift.cpu()
                contrib_w[rows] = g_top.cpu()
                # per-particle outputs at the best class (the first refined class may differ)
                pos = (res.classes == best[:, None]).float().argmax(1)
                rot_b = res.rotation.gather(1, pos[:, None])[:, 0]
                sh_b = res.shift.gather(1, pos[:, None, None].expand(-1, 1, 2))[:, 0]
                ps = res.pose_scores.gather(
                    1, pos[:, None, None].expand(-1, 1, res.pose_scores.shape[-1])
                )[:, 0]
                p_pose = torch.softmax(ps / annealing, -1)
                const = -(w_align * x.abs() ** 2).sum(1)
                sel = np.asarray(idx)
                assignments.best_class[sel] = best.cpu().numpy()
                assignments.psi_deg[sel] = self.space.fine_angles_deg[rot_b].cpu().numpy()
                assignments.shift_px[sel] = sh_b.cpu().numpy()
                assignments.max_prob[sel] = (
                    (gamma.max(1).values * p_pose.max(-1).values).cpu().numpy()
                )
                assignments.ess_pose[sel] = (1.0 / (p_pose**2).sum(-1)).cpu().numpy()
                assignments.ess_class[sel] = ess_class.cpu().numpy()
                assignments.loglik[sel] = (
                    (res.class_loglik.gather(1, best[:, None])[:, 0] + const).cpu().numpy()
                )
                # noise: residual power at the best class and pose
                tmpl = table.reshape(k * self.space.n_fine, -1)[best * self.space.n_fine + rot_b]
                model = ctf[:, band] * tmpl * self.align_phases(sh_b).conj()
                noise_sum += self.align_grid.ring_average((x[:, band] - model).abs() ** 2).sum(0)
            del table, tables
        t_e = time.perf_counter() - t0
        counts_hard = np.bincount(assignments.best_class[indices], minlength=k)
        num, den = self._accumulate(
            pool, order, contrib_cls, contrib_rot, contrib_shift, contrib_w
        )
        eta = step_size
        self.num = (1 - eta) * self.num + eta * num
        self.den = (1 - eta) * self.den + eta * den
        # rings outside the alignment band keep their estimate
        in_band = torch.bincount(self.align_grid.ring, minlength=self.grid.n_rings) > 0
        batch_noise = torch.where(in_band, noise_sum / n, self.noise)
        if cfg.white_noise:
            batch_noise = torch.full_like(batch_noise, float((batch_noise[self.grid.ring]).mean()))
        self.noise = ((1 - eta) * self.noise + eta * batch_noise).clamp(min=1e-12)
        soft = counts_soft / n
        self.prior = ((1 - eta) * self.prior + eta * soft).clamp(min=1e-8)
        self.prior = self.prior / self.prior.sum()
        if online and cfg.reseed_empty_classes:
            self._reseed(pool, indices, assignments, counts_soft, rng)
        self._update_references()
        self.n_updates += 1
        t_m = time.perf_counter() - t0 - t_e
        evals = n * (
            k * self.space.n_coarse * self.space.coarse_shifts.shape[0]
            # pose band: P coarse poses, J rotations, 9 shifts; then the full band once
            + self.space.n_candidates
            * (self.space.n_coarse_poses + self.space.refine_offsets.numel() + 9 + 1)
            + self.space.n_refine * (9 + 4)  # polish: 0.5-px shifts, ±2 fine rotations
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
            },
        )

    # -- M-step ------------------------------------------------------------------------
    def _accumulate(
        self,
        pool: ParticlePool,
        indices: np.ndarray,
        classes: torch.Tensor,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sufficient statistics of the given contributions, per half set.

        ``classes, rotations, weights``: ``(n, N)``; ``shifts``: ``(n, N, 2)`` px.
        Only contributions with a positive weight are back-rotated.
        """
        k, g = self.config.n_classes, self.grid
        num = torch.zeros((2, k, g.n), dtype=torch.complex64, device=self.device)
        den = torch.zeros((2, k, g.n), device=self.device)
        weight = self._weight()
        mode = self.config.ctf_correction
        half = torch.from_numpy(pool.half[indices])
        rows, cols = torch.nonzero(weights > 0, as_tuple=True)
        chunk = pool.chunk_size_for(4 * g.box * g.box * 16, self.config.memory_budget_GB)
        if self.device.type == "cpu":
            chunk = min(chunk, 128)
        for s in range(0, rows.numel(), chunk):
            r, c = rows[s : s + chunk], cols[s : s + chunk]
            pidx = indices[r.numpy()]
            x, ctf_vals, params = pool.get(pidx, self.device)
            kk = classes[r, c].to(self.device)
            angle = self.space.fine_angles_deg[rotations[r, c].to(self.device)]
            w = weights[r, c].to(self.device)
            sh = shifts[r, c].to(self.device)
            data_ctf = torch.ones_like(ctf_vals) if mode == "off" else ctf_vals
            vals = (w[:, None] * weight) * data_ctf * x * self.phases(sh)
            vals = back_rotate(vals, angle, g)
            dens = (w[:, None] * weight) * rotated_ctf_weight(
                params, angle, g, self.pixel_size_A, mode
            )
            slot = half[r].to(self.device) * k + kk
            num.view(2 * k, -1).index_add_(0, slot, vals)
            den.view(2 * k, -1).index_add_(0, slot, dens)
        return num, den

    def _reseed(
        self,
        pool: ParticlePool,
        indices: np.ndarray,
        assignments: ParticleAssignments,
        counts_soft: torch.Tensor,
        rng: np.random.Generator,
    ) -> None:
        """Refill emptied classes by splitting the most populated class of this batch.

        The donor's worse-fitting half (by log-likelihood) seeds the emptied class at
        their current poses, so the two can specialise.
        """
        k = self.config.n_classes
        mean = float(counts_soft.sum()) / k
        empty = torch.nonzero(counts_soft < EMPTY_FRACTION * mean).flatten().tolist()
        if not empty:
            return
        best = assignments.best_class[indices]
        counts = np.bincount(best, minlength=k).astype(float)
        for e in empty:  # loop over emptied classes (a handful), not particles
            donor = int(np.argmax(counts))
            members = indices[best == donor]
            if len(members) < 4:
                return
            ll = assignments.loglik[members]
            worse = members[ll <= np.median(ll)]
            rot = np.round(assignments.psi_deg[worse] / (360.0 / self.space.n_fine)).astype(int)
            num, den = self._accumulate(
                pool,
                worse,
                torch.full((len(worse), 1), e),
                torch.from_numpy(rot % self.space.n_fine)[:, None],
                torch.from_numpy(assignments.shift_px[worse]).float()[:, None, :],
                torch.ones((len(worse), 1)),
            )
            scale = float(self.den[:, donor].sum() / den[:, e].sum().clamp(min=1e-30)) / 2
            self.num[:, e] = num[:, e] * scale
            self.den[:, e] = den[:, e] * scale
            self.prior[e] = self.prior[donor] = float(self.prior[donor]) / 2
            counts[donor] /= 2
            best = np.where(np.isin(indices, worse), e, best)
        self.prior = self.prior / self.prior.sum()

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
        avg, inv_tau2 = half_set_wiener(self.num, self.den, g, self.config.regularisation_factor)
        images = g.inverse(avg) * self.mask
        if self.config.clamp_solvent:
            images = clamp_solvent(
                self.num.reshape(2 * k, -1),
                self.den.reshape(2 * k, -1),
                inv_tau2.reshape(2 * k, -1),
                self.support,
                g,
                images.reshape(2 * k, g.box, g.box),
            ).reshape(2, k, g.box, g.box)
        return images.flip(0)

    def _update_references(self) -> None:
        """Wiener averages, mask or clamp-solvent, re-centring, FRC resolution."""
        cfg, g = self.config, self.grid
        total_den = self.den.sum(0)
        avg, inv_tau2, frc = wiener(self.num, self.den, g, cfg.regularisation_factor)

        def masked_images(avg: torch.Tensor) -> torch.Tensor:
            images = g.inverse(avg) * self.mask
            if cfg.clamp_solvent:
                images = clamp_solvent(
                    self.num.sum(0), total_den, inv_tau2, self.support, g, images
                )
            return images

        images = masked_images(avg)
        if cfg.recenter:
            shift = centre_of_mass_shift(images, cfg.recenter_threshold, cfg.recenter_binary)
            shift = torch.where(shift.norm(dim=-1, keepdim=True) > 0.5, shift, 0.0)
            if bool((shift != 0).any()):
                phase = g.shift_phase(shift, -1.0)
                self.num = self.num * phase[None]
                images = masked_images(avg * phase)
        self.frc = frc
        self.resolution = resolution_from_frc(frc, g, self.pixel_size_A)
        self.references = images

    # -- reporting ---------------------------------------------------------------------
    def class_averages(self) -> np.ndarray:
        return self.references.detach().cpu().numpy().astype(np.float32)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> first CUDA device when present, else CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA device is available")
    return dev
