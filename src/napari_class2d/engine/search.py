"""E-step: the coarse-to-fine pose search and class posteriors, batched on the device.

For a chunk of particles the search runs in three batched stages, never a Python
loop over particles, classes or poses:

1. **Coarse**, every class: low-resolution band (``|f| <= r_coarse``), coarse
   rotations and a coarse shift grid, as one real matrix product
   ``(B·T, 2F_c) @ (2F_c, K·R_c)`` plus the shift-invariant norm term
   ``(B, F_c) @ (F_c, K·R_c)``. Gives each class's best coarse poses; the
   ``n_candidates`` best classes go on.
2. **Pose band** (half the alignment band), every candidate: the best of its
   ``n_coarse_poses`` coarse poses, refined locally (fine rotations around the
   coarse one, then the 3x3 one-pixel shift neighbourhood); then the full
   alignment band at that pose. Every candidate gets the same refinement, so no
   class wins on a better-refined pose alone.
3. **Polish** of the ``n_refine`` best classes on the full band: 0.5-px shifts,
   then ±2 fine rotations.

Scores are the pose-dependent part of the log-likelihood
``2 Re Σ w X conj(CTF T) - Σ w CTF² |T|²`` (half-plane sums, ``w = 1/σ²``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import torch

from napari_class2d.engine.fourier import FourierGrid


@dataclass
class SearchSpace:
    """Rotations and shifts searched, at the working box.

    Attributes
    ----------
    fine_angles_deg
        ``(R_f,)`` fine in-plane angles; the coarse angles are every ``stride``-th.
    stride
        Fine steps per coarse step.
    refine_offsets
        Fine-rotation offsets tried around the coarse rotation, ``(J,)`` ints.
    coarse_shifts
        ``(T, 2)`` coarse shift grid in working pixels (x, y).
    coarse_band, align_band
        Boolean masks over the kept frequencies.
    n_refine
        Classes refined per particle.
    n_candidates
        Classes scored over the full alignment band per particle.
    pose_band
        Boolean mask over the kept frequencies on which the ``n_coarse_poses`` best
        coarse poses of a candidate class are compared (``None``: the alignment band).
    n_coarse_poses
        Best coarse poses of each candidate class compared on the pose band before
        the class is scored over the full band: at low SNR the coarse maximum alone
        is often a wrong pose, and the class then loses to a wrong class.
    max_shift_px
        No shift longer than this (working pixels) is accepted.
    """

    fine_angles_deg: torch.Tensor
    stride: int
    refine_offsets: torch.Tensor
    coarse_shifts: torch.Tensor
    coarse_band: torch.Tensor
    align_band: torch.Tensor
    n_refine: int
    n_candidates: int
    max_shift_px: float
    pose_band: torch.Tensor | None = None
    n_coarse_poses: int = 1

    @property
    def coarse_in_align(self) -> torch.Tensor:
        """The coarse band as a mask over the alignment band's coefficients."""
        return self.coarse_band[self.align_band]

    @property
    def pose_in_align(self) -> torch.Tensor:
        """The pose band as a mask over the alignment band's coefficients."""
        band = self.align_band if self.pose_band is None else self.pose_band
        return band[self.align_band]

    # index tensors of the bands, made once: indexing with a boolean mask makes every
    # chunk on a GPU wait for the mask's count (a device-to-host copy)
    @cached_property
    def align_index(self) -> torch.Tensor:
        """The alignment band's coefficients, as positions in the grid."""
        return torch.nonzero(self.align_band).flatten()

    @cached_property
    def coarse_index(self) -> torch.Tensor:
        """The coarse band, as positions within the alignment band."""
        return torch.nonzero(self.coarse_in_align).flatten()

    @cached_property
    def pose_index(self) -> torch.Tensor:
        """The pose band, as positions within the alignment band."""
        return torch.nonzero(self.pose_in_align).flatten()

    @property
    def n_fine(self) -> int:
        return int(self.fine_angles_deg.numel())

    @property
    def n_coarse(self) -> int:
        return self.n_fine // self.stride

    @classmethod
    def create(
        cls,
        grid: FourierGrid,
        inplane_step_deg: float,
        max_shift_px: float,
        min_align_radius: float,
        max_align_radius: float,
        n_classes: int,
        device: torch.device,
    ) -> SearchSpace:
        align = grid.band(max(min_align_radius, 0.5), max_align_radius)
        # coarse band: a third of the alignment band (at least 8 Fourier pixels)
        r_coarse = min(max_align_radius, max(8.0, max_align_radius / 3.0))
        coarse = grid.band(max(min_align_radius, 0.5), r_coarse)
        if int(coarse.sum()) < 8:  # very narrow band: coarse pass uses the alignment band
            coarse = align.clone()
            r_coarse = max_align_radius
        # pose band: half the alignment band
        pose = grid.band(max(min_align_radius, 0.5), max(r_coarse, 0.5 * max_align_radius))
        # coarse rotations: about two pixels of arc at the edge of the coarse band
        n_coarse = int(max(8, min(72, round(torch.pi * r_coarse / 4.0) * 4)))
        stride = max(1, int(-(-360.0 / inplane_step_deg // n_coarse)))
        n_fine = n_coarse * stride
        half = stride // 2 + 1 if stride > 1 else 0
        offsets = torch.tensor([j for j in range(-half, half + 1) if j != 0], dtype=torch.long)
        # coarse shifts: 1 px steps for short ranges, 2 px up to 12 px, 3 px beyond
        step = 1 if max_shift_px <= 2.0 else (2 if max_shift_px <= 12.0 else 3)
        r = int(max_shift_px // step)
        g = torch.arange(-r, r + 1, dtype=torch.float32) * step
        sx, sy = torch.meshgrid(g, g, indexing="xy")
        shifts = torch.stack((sx.flatten(), sy.flatten()), 1)
        shifts = shifts[(shifts**2).sum(1) <= max_shift_px**2 + 1e-6]
        return cls(
            fine_angles_deg=torch.arange(n_fine, device=device, dtype=torch.float32)
            * (360.0 / n_fine),
            stride=stride,
            refine_offsets=offsets.to(device),
            coarse_shifts=shifts.to(device),
            coarse_band=coarse.to(device),
            align_band=align.to(device),
            n_refine=min(n_classes, 3),
            n_candidates=min(n_classes, 10),
            max_shift_px=float(max_shift_px),
            pose_band=(pose & align).to(device),
            n_coarse_poses=COARSE_POSES,
        )


@dataclass
class MarginalResult:
    """Per particle of a chunk: classes scored with their in-plane rotations marginalised.

    Attributes
    ----------
    class_loglik
        ``(B, K)``: ``u · log Σ_r exp(s_kr / u) - u · log R_c`` with ``s_kr`` the best
        score over the coarse shifts at coarse rotation ``r`` and ``u`` the annealing
        factor, i.e. the log-likelihood with a uniform prior over rotations.
    rotation_posterior
        ``(B, K, R_c)``: the rotation posterior within each class.
    rotation
        ``(B, K)`` fine rotation index of each class's best coarse pose.
    shift
        ``(B, K, 2)`` its shift in working pixels (x, y).
    """

    class_loglik: torch.Tensor
    rotation_posterior: torch.Tensor
    rotation: torch.Tensor
    shift: torch.Tensor


@dataclass
class SearchResult:
    """Per particle of a chunk: class scores and the best pose per refined class.

    Attributes
    ----------
    class_loglik
        ``(B, K)`` log-likelihood (pose-dependent part) of each class: best pose
        (force max) or log-sum-exp over the evaluated poses (marginalise).
    classes
        ``(B, N)`` the refined classes, best first by coarse-pose score.
    rotation
        ``(B, N)`` fine rotation index of each refined class's best pose.
    shift
        ``(B, N, 2)`` best shift in working pixels (x, y).
    pose_scores
        ``(B, N, P)`` scores of the evaluated poses of each refined class.
    marginal
        The coarse pass with rotations marginalised (:func:`marginal_scores`).
    """

    class_loglik: torch.Tensor
    classes: torch.Tensor
    rotation: torch.Tensor
    shift: torch.Tensor
    pose_scores: torch.Tensor
    marginal: MarginalResult | None = None


#: best coarse poses of each candidate class compared on the pose band (see SearchSpace)
COARSE_POSES = 4


@cache
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """Small constant tensors, made once per device (not copied to a GPU every chunk)."""
    if name == "neighbours":
        values = [[dx, dy] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        return torch.tensor(values, dtype=torch.float32, device=device)
    if name == "fine_offsets":
        return torch.tensor([-2, -1, 1, 2], device=device)
    raise KeyError(name)


def _neighbour_shifts(
    shift: torch.Tensor, step: float, max_shift_px: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 neighbourhood of ``shift`` ``(..., 2)`` at ``step`` px: candidates
    ``(..., 9, 2)`` and a mask of those beyond ``max_shift_px``."""
    cand = shift[..., None, :] + _constant("neighbours", shift.device) * step
    return cand, (cand**2).sum(-1) > max_shift_px**2 + 1e-6


def _keep_better(
    scores: torch.Tensor,
    tried: torch.Tensor,
    current: torch.Tensor,
    best: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best of ``scores`` ``(B, N, Q)`` over the tried poses where it beats ``best``.

    ``tried``: rotations ``(B, N, Q)`` or shifts ``(B, N, Q, 2)``; ``current``: the
    pose kept so far, ``(B, N)`` or ``(B, N, 2)``. Returns the new pose and score.
    """
    val, arg = scores.max(-1)
    better = val > best
    if tried.dim() == 3:
        pick = tried.gather(2, arg[..., None])[..., 0]
        return torch.where(better, pick, current), torch.maximum(val, best)
    b, n = arg.shape
    pick = tried.gather(2, arg[..., None, None].expand(b, n, 1, 2))[:, :, 0]
    return torch.where(better[..., None], pick, current), torch.maximum(val, best)


class PhaseTable:
    """``exp(+2πi f·t/D)`` for shifts on a ``step``-pixel grid within ``radius`` pixels.

    A lookup replaces sin/cos of every (particle, class, shift, frequency).
    """

    def __init__(self, grid: FourierGrid, radius: int, device: torch.device, step: float = 0.5):
        self.step = step
        self.radius = int(round(radius / step))
        g = torch.arange(-self.radius, self.radius + 1, device=device, dtype=torch.float32) * step
        sx, sy = torch.meshgrid(g, g, indexing="xy")
        shifts = torch.stack((sx.flatten(), sy.flatten()), 1)
        self.table = grid.shift_phase(shifts, +1.0)  # ((2r+1)², F)
        self.width = 2 * self.radius + 1

    def index(self, shifts: torch.Tensor) -> torch.Tensor:
        """Row of the table for shifts ``(..., 2)`` in pixels (rounded to the step)."""
        s = torch.round(shifts / self.step).long().clamp(-self.radius, self.radius) + self.radius
        return s[..., 1] * self.width + s[..., 0]

    def __call__(self, shifts: torch.Tensor) -> torch.Tensor:
        return self.table[self.index(shifts)]


def _real(z: torch.Tensor) -> torch.Tensor:
    """Interleaved real view ``(..., 2F)`` of complex ``(..., F)`` (no copy when contiguous)."""
    return torch.view_as_real(z).flatten(-2)


def _cross(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Re Σ_f p·conj(t)`` as a batched real matrix product.

    ``p``: ``(G, M, F)`` complex, ``t``: ``(G, Q, F)`` complex -> ``(G, M, Q)``.
    """
    return torch.bmm(_real(p.contiguous()), _real(t.contiguous()).transpose(1, 2))


def _norm(wc2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ_f wc2·|t|²``; ``wc2``: ``(G, F)``, ``t``: ``(G, Q, F)`` -> ``(G, Q)``."""
    power = torch.view_as_real(t).square().sum(-1)
    return torch.bmm(power, wc2[:, :, None])[..., 0]


@dataclass
class SearchTables:
    """Per-iteration constants of the search, built once and shared by all chunks.

    Attributes
    ----------
    table
        ``(K, R_f, F_a)`` complex class coefficients at every fine rotation.
    coarse_real
        ``(2F_c, K·R_c)`` interleaved real coarse templates (matrix-product operand).
    coarse_power
        ``(F_c, K·R_c)`` their power ``|T|²``.
    coarse_phases
        ``(T, F_c)`` shift phases of the coarse shift grid.
    pose_table, pose_phases
        ``(K·R_f, F_p)`` class coefficients and ``(S, F_p)`` shift phases (every row
        of the phase table) on the pose band.
    """

    table: torch.Tensor
    coarse_real: torch.Tensor
    coarse_power: torch.Tensor
    coarse_phases: torch.Tensor
    pose_table: torch.Tensor | None = None
    pose_phases: torch.Tensor | None = None

    @classmethod
    def build(cls, table: torch.Tensor, space: SearchSpace, phases: PhaseTable) -> SearchTables:
        k = table.shape[0]
        cb = space.coarse_in_align
        tc = table[:, :: space.stride][:, :, cb]  # (K, Rc, Fc)
        return cls(
            table=table.contiguous(),
            coarse_real=_real(tc).reshape(k * space.n_coarse, -1).T.contiguous(),
            coarse_power=torch.view_as_real(tc)
            .square()
            .sum(-1)
            .reshape(k * space.n_coarse, -1)
            .T.contiguous(),
            coarse_phases=phases.table[phases.index(space.coarse_shifts)][:, cb].contiguous(),
            pose_table=table.reshape(k * space.n_fine, -1)[:, space.pose_in_align].contiguous()
            if space.pose_band is not None
            else None,
            pose_phases=phases.table[:, space.pose_in_align].contiguous()
            if space.pose_band is not None
            else None,
        )


def coarse_scores(
    wx: torch.Tensor, wc2: torch.Tensor, tables: SearchTables, space: SearchSpace
) -> torch.Tensor:
    """Scores of every class at every coarse rotation and shift on the coarse band.

    ``wx = w·CTF·X`` and ``wc2 = w·CTF²`` over the alignment band, ``(B, F_a)``.
    One real matrix product ``(B·T, 2F_c) @ (2F_c, K·R_c)`` plus the shift-invariant
    norm term. Returns ``(B, K, T, R_c)``.
    """
    b = wx.shape[0]
    k = tables.table.shape[0]
    cb = space.coarse_index
    shifted = wx[:, None, cb] * tables.coarse_phases[None]  # (B, T, Fc)
    n_t = shifted.shape[1]
    s1 = (_real(shifted).reshape(b * n_t, -1) @ tables.coarse_real).reshape(
        b, n_t, k, space.n_coarse
    )
    s1 = 2.0 * s1 - (wc2[:, cb] @ tables.coarse_power).reshape(b, 1, k, space.n_coarse)
    return s1.permute(0, 2, 1, 3)


def marginal_scores(s1: torch.Tensor, space: SearchSpace, annealing: float) -> MarginalResult:
    """The coarse pass's scores ``(B, K, T, R_c)`` with in-plane rotations marginalised.

    Each coarse rotation keeps its best shift and the class likelihood sums over the
    rotations (uniform prior). While a particle fits many rotations almost equally
    (smooth, blob-like classes; junk), summing over them instead of taking the best,
    which the particle's noise decides, keeps the classes from reproducing noise.
    """
    n_r = s1.shape[-1]
    per_rot, t_best = s1.max(2)  # (B, K, Rc)
    lse = torch.logsumexp(per_rot / annealing, -1)
    class_loglik = annealing * (lse - math.log(n_r))
    post = torch.softmax(per_rot / annealing, -1)
    r_best = per_rot.argmax(-1)  # (B, K)
    t_of = t_best.gather(2, r_best[..., None])[..., 0]
    return MarginalResult(
        class_loglik=class_loglik,
        rotation_posterior=post,
        rotation=r_best * space.stride,
        shift=space.coarse_shifts[t_of].float(),
    )


def search(
    x: torch.Tensor,
    ctf: torch.Tensor,
    weight: torch.Tensor,
    tables: SearchTables,
    space: SearchSpace,
    grid: FourierGrid,
    force_max: bool,
    annealing: float,
    phases: PhaseTable,
    shift_penalty: float = 0.0,
) -> SearchResult:
    """Score the classes for a chunk of particles.

    Parameters
    ----------
    x
        ``(B, F)`` complex particle coefficients.
    ctf
        ``(B, F)`` CTF used in the likelihood model (1 when CTF correction is off).
    weight
        ``(F,)`` inverse noise variance ``1/σ²`` (0 outside the alignment band).
    tables
        Per-iteration constants (:class:`SearchTables`): the class coefficients at every
        fine rotation over the alignment band, and the coarse-pass operands.
    force_max
        Class score at the best pose (True) or log-sum-exp over evaluated poses.
    annealing
        Temperature used for the pose posterior in marginalisation.
    phases
        Shift phases on the alignment band.
    shift_penalty
        A Gaussian prior on the shifts (from the pick): ``shift_penalty · |t|²`` (score
        units per px²) is subtracted from the score of every pose with shift ``t``
        (0: a uniform prior within ``max_shift_px``).

    Classes outside the ``n_candidates`` best by coarse score get ``-inf``
    (posterior 0): at the coarse resolution they already fit far worse.
    """
    b = x.shape[0]
    table = tables.table
    k, n_fine, _ = table.shape
    n_coarse, stride = space.n_coarse, space.stride
    band = space.align_index
    wx = (x * ctf * weight)[:, band]
    wc2 = (ctf * ctf * weight)[:, band]
    dev = x.device

    def with_prior(scores: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``scores`` less the shift prior's term of ``shifts`` ``(..., 2)`` px (broadcast
        over the scores' last dimensions); unchanged without a prior."""
        if not shift_penalty:
            return scores
        return scores - shift_penalty * (shifts**2).sum(-1)

    # 1. coarse: every class, coarse rotations and shifts, one matrix product
    s1 = with_prior(coarse_scores(wx, wc2, tables, space), space.coarse_shifts[:, None])
    marginal = marginal_scores(s1, space, annealing)
    s1 = s1.reshape(b, k, -1)
    n_p = min(space.n_coarse_poses, s1.shape[-1])
    top_s1, best = s1.topk(n_p, dim=-1)  # (B, K, P) best coarse poses of each class
    coarse_score = top_s1[..., 0]
    del s1, top_s1

    # 2. pose band, every candidate class: its P best coarse poses, then local
    #    refinement (fine rotations around the coarse one, 1-px shifts). Every
    #    candidate gets the same refinement, so none is favoured by a better pose.
    n1 = space.n_candidates
    cand = coarse_score.topk(n1, dim=1).indices  # (B, N1)
    best = best.gather(1, cand[..., None].expand(b, n1, n_p))  # (B, N1, P)
    rot = (best % n_coarse) * stride  # fine rotation index (B, N1, P)
    shift = space.coarse_shifts[best // n_coarse]  # (B, N1, P, 2)
    flat = table.reshape(k * n_fine, -1)
    pb = space.pose_index
    pose_flat = tables.pose_table if tables.pose_table is not None else flat
    pose_phase = tables.pose_phases if tables.pose_phases is not None else phases.table
    wx_p, wc2_p = wx[:, pb], wc2[:, pb]

    def pose_band_scores(rots: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Scores on the pose band: rotations ``(B, N1, Qr)`` x shifts ``(B, N1, Qs, 2)``,
        broadcast to ``(B, N1, max(Qr, Qs))``."""
        g = torch.view_as_real(pose_flat[cand[..., None] * n_fine + rots])  # (B,N1,Qr,Fp,2)
        p = torch.view_as_real(wx_p[:, None, None, :] * pose_phase[phases.index(shifts)])
        cross = (p * g).sum((-1, -2))
        score = 2.0 * cross - (g.square().sum(-1) * wc2_p[:, None, None, :]).sum(-1)
        return with_prior(score, shifts)

    sp = pose_band_scores(rot, shift)
    score_p, pick = sp.max(-1)  # (B, N1)
    rot = rot.gather(2, pick[..., None])[..., 0]
    shift = shift.gather(2, pick[..., None, None].expand(b, n1, 1, 2))[:, :, 0]
    rots = (rot[..., None] + space.refine_offsets) % n_fine  # (B, N1, J)
    rot, score_p = _keep_better(pose_band_scores(rots, shift[:, :, None, :]), rots, rot, score_p)
    cand_sh, too_far = _neighbour_shifts(shift, 1.0, space.max_shift_px)  # (B, N1, 9, 2)
    sc = pose_band_scores(rot[..., None], cand_sh).masked_fill(too_far, -torch.inf)
    shift, score_p = _keep_better(sc, cand_sh, shift, score_p)
    # full alignment band at each candidate's refined pose
    g = flat[cand * n_fine + rot].reshape(b * n1, 1, -1)  # (B·N1, 1, Fa)
    p = (wx[:, None, :] * phases(shift)).reshape(b * n1, 1, -1)
    wc2_1 = wc2.repeat_interleave(n1, 0)
    s2 = with_prior((2.0 * _cross(p, g)[:, 0, 0] - _norm(wc2_1, g)[:, 0]).reshape(b, n1), shift)
    del g, p

    # 3. the best classes are polished on the full band: 0.5-px shifts, ±2 fine rotations
    n = space.n_refine
    order = s2.topk(n, dim=1).indices  # positions within the candidates
    top = cand.gather(1, order)
    rot_b = rot.gather(1, order)
    sh_b = shift.gather(1, order[..., None].expand(b, n, 2))
    score_b = s2.gather(1, order)
    wc2_n = wc2.repeat_interleave(n, 0)
    evaluated = [score_b[..., None]]
    fine_offsets = _constant("fine_offsets", dev)
    for kind, offs in (("shift", 0.5), ("rot", fine_offsets)):
        if kind == "rot":
            tried = (rot_b[..., None] + offs) % n_fine  # (B, N, J)
            j = tried.shape[-1]
            g = flat[top[..., None] * n_fine + tried].reshape(b * n, j, -1)
            p = (wx[:, None, :] * phases(sh_b)).reshape(b * n, 1, -1)
            sc = (2.0 * _cross(p, g)[:, 0] - _norm(wc2_n, g)).reshape(b, n, j)
            sc = with_prior(sc, sh_b[..., None, :])
            rot_b, new_score = _keep_better(sc, tried, rot_b, score_b)
        else:
            tried, too_far = _neighbour_shifts(sh_b, offs, space.max_shift_px)  # (B, N, 9, 2)
            g = flat[top * n_fine + rot_b].reshape(b * n, 1, -1)
            p = (wx[:, None, None, :] * phases(tried)).reshape(b * n, 9, -1)
            sc = with_prior((2.0 * _cross(p, g)[..., 0] - _norm(wc2_n, g)).reshape(b, n, 9), tried)
            sc = sc.masked_fill(too_far, -torch.inf)
            sh_b, new_score = _keep_better(sc, tried, sh_b, score_b)
        evaluated.append(sc)
        score_b = new_score
        del g, p
    rot_best, shift_best = rot_b, sh_b
    pose_scores = torch.cat(evaluated, -1)

    if force_max:
        refined = score_b
    else:
        # uniform prior over the evaluated poses; temperature as for classes
        refined = annealing * torch.logsumexp(pose_scores / annealing, -1)
    loglik = torch.full((b, k), -torch.inf, device=dev)
    loglik.scatter_(1, cand, s2)
    loglik.scatter_(1, top, refined)
    return SearchResult(loglik, top, rot_best, shift_best.float(), pose_scores, marginal)
