"""E-step: the coarse-to-fine pose search and class posteriors, batched on the device.

For a chunk of particles the search runs in three batched stages, never a Python
loop over particles, classes or poses:

1. **Coarse**, every class: low-resolution band (``|f| <= r_coarse``), coarse
   rotations and a coarse shift grid, as one real matrix product
   ``(B·T, 2F_c) @ (2F_c, K·R_c)`` plus the shift-invariant norm term
   ``(B, F_c) @ (F_c, K·R_c)``. Gives each class's best coarse pose.
2. **Full band at the coarse pose**, every class: the log-likelihood over the whole
   alignment band at that pose; the best ``n_refine`` classes go on.
3. **Local refinement** of those classes: fine rotations around the coarse one,
   then the 3x3 one-pixel shift neighbourhood around the best shift.

Scores are the pose-dependent part of the log-likelihood
``2 Re Σ w X conj(CTF T) - Σ w CTF² |T|²`` (half-plane sums, ``w = 1/σ²``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    fine_angles_deg: torch.Tensor
    stride: int
    refine_offsets: torch.Tensor
    coarse_shifts: torch.Tensor
    coarse_band: torch.Tensor
    align_band: torch.Tensor
    n_refine: int

    @property
    def coarse_in_align(self) -> torch.Tensor:
        """The coarse band as a mask over the alignment band's coefficients."""
        return self.coarse_band[self.align_band]

    @property
    def n_fine(self) -> int:
        return int(self.fine_angles_deg.numel())

    @property
    def n_coarse(self) -> int:
        return self.n_fine // self.stride

    @classmethod
    def create(cls, grid: FourierGrid, inplane_step_deg: float, max_shift_px: float,
               min_align_radius: float, max_align_radius: float, n_classes: int,
               device: torch.device) -> SearchSpace:
        align = grid.band(max(min_align_radius, 0.5), max_align_radius)
        r_coarse = min(max_align_radius, max(8.0, 0.2 * max_align_radius))
        coarse = grid.band(max(min_align_radius, 0.5), r_coarse)
        if int(coarse.sum()) < 8:  # very narrow band: coarse pass uses the alignment band
            coarse = align.clone()
            r_coarse = max_align_radius
        # coarse rotations: about two pixels of arc at the edge of the coarse band
        n_coarse = int(max(8, min(72, round(torch.pi * r_coarse / 4.0) * 4)))
        stride = max(1, int(-(-360.0 / inplane_step_deg // n_coarse)))
        n_fine = n_coarse * stride
        half = stride // 2 + 1 if stride > 1 else 0
        offsets = torch.tensor([j for j in range(-half, half + 1) if j != 0], dtype=torch.long)
        # coarse shifts: the finest grid with steps <= 3 px that keeps the search cheap
        step = 1 if max_shift_px <= 2.0 else (2 if max_shift_px <= 6.0 else 3)
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
            n_refine=min(n_classes, 5),
        )


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
    """

    class_loglik: torch.Tensor
    classes: torch.Tensor
    rotation: torch.Tensor
    shift: torch.Tensor
    pose_scores: torch.Tensor


_NEIGHBOURS = torch.tensor([[dx, dy] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                           dtype=torch.long)


class PhaseTable:
    """``exp(+2πi f·t/D)`` for every integer shift ``|tx|, |ty| <= radius`` (a lookup, not sin/cos)."""

    def __init__(self, grid: FourierGrid, radius: int, device: torch.device):
        self.radius = radius
        g = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
        sx, sy = torch.meshgrid(g, g, indexing="xy")
        shifts = torch.stack((sx.flatten(), sy.flatten()), 1)
        self.table = grid.shift_phase(shifts, +1.0)  # ((2r+1)², F)
        self.width = 2 * radius + 1

    def index(self, shifts: torch.Tensor) -> torch.Tensor:
        """Row of the table for integer shifts ``(..., 2)``."""
        s = shifts.long().clamp(-self.radius, self.radius) + self.radius
        return s[..., 1] * self.width + s[..., 0]

    def __call__(self, shifts: torch.Tensor) -> torch.Tensor:
        return self.table[self.index(shifts)]


def _cross(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Re Σ_f p·conj(t)`` as a batched real matrix product.

    ``p``: ``(G, M, F)`` complex, ``t``: ``(G, Q, F)`` complex -> ``(G, M, Q)``.
    """
    pr = torch.cat((p.real, p.imag), -1)
    tr = torch.cat((t.real, t.imag), -1)
    return torch.bmm(pr, tr.transpose(1, 2))


def _norm(wc2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ_f wc2·|t|²``; ``wc2``: ``(G, F)``, ``t``: ``(G, Q, F)`` -> ``(G, Q)``."""
    power = t.real**2 + t.imag**2
    return torch.bmm(power, wc2[:, :, None])[..., 0]


def search(x: torch.Tensor, ctf: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
           space: SearchSpace, grid: FourierGrid, force_max: bool, annealing: float,
           phases: PhaseTable) -> SearchResult:
    """Score every class for a chunk of particles.

    Parameters
    ----------
    x
        ``(B, F)`` complex particle coefficients.
    ctf
        ``(B, F)`` CTF used in the likelihood model (1 when CTF correction is off).
    weight
        ``(F,)`` inverse noise variance ``1/σ²`` (0 outside the alignment band).
    table
        ``(K, R_f, F_a)`` complex coefficients of every class at every fine rotation,
        restricted to the alignment band.
    force_max
        Class score at the best pose (True) or log-sum-exp over evaluated poses.
    annealing
        Temperature used for the pose posterior in marginalisation.
    phases
        Shift phases on the alignment band.
    """
    b = x.shape[0]
    k, n_fine, _ = table.shape
    n_coarse, stride = space.n_coarse, space.stride
    band = space.align_band
    wx = (x * ctf * weight)[:, band]
    wc2 = (ctf * ctf * weight)[:, band]
    cb = space.coarse_in_align

    # 1. coarse: every class, coarse rotations and shifts, one matrix product
    tc = table[:, ::stride][:, :, cb]  # (K, Rc, Fc)
    tc_real = torch.cat((tc.real, tc.imag), -1).reshape(k * n_coarse, -1).T  # (2Fc, K·Rc)
    tc_pow = (tc.real**2 + tc.imag**2).reshape(k * n_coarse, -1).T  # (Fc, K·Rc)
    shift_rows = phases.index(space.coarse_shifts)
    shifted = wx[:, None, cb] * phases.table[shift_rows][:, cb][None]  # (B, T, Fc)
    n_t = shifted.shape[1]
    p_real = torch.cat((shifted.real, shifted.imag), -1).reshape(b * n_t, -1)
    s1 = 2.0 * (p_real @ tc_real).reshape(b, n_t, k, n_coarse)
    s1 = s1 - (wc2[:, cb] @ tc_pow).reshape(b, 1, k, n_coarse)
    best = s1.permute(0, 2, 1, 3).reshape(b, k, n_t * n_coarse).argmax(-1)  # (B, K)
    t_idx, r_idx = best // n_coarse, best % n_coarse
    del s1, shifted, p_real

    # 2. full alignment band at each class's coarse pose (all coarse shifts via one bmm)
    rot = r_idx * stride  # fine index, (B, K)
    flat = table.reshape(k * n_fine, -1)
    kk = torch.arange(k, device=x.device)[None, :].expand(b, k)
    g = flat[kk * n_fine + rot]  # (B, K, Fa)
    p_all = wx[:, None, :] * phases.table[shift_rows][None]  # (B, T, Fa)
    cross = _cross(g, p_all)  # (B, K, T)
    s2 = 2.0 * cross.gather(2, t_idx[..., None])[..., 0] - _norm(wc2, g)  # (B, K)
    shift = space.coarse_shifts[t_idx]  # (B, K, 2)
    del g, cross

    # 3. refine the best classes: rotations, then shifts
    n = space.n_refine
    top = s2.topk(n, dim=1).indices  # (B, N)
    rot_top = rot.gather(1, top)
    sh_top = shift.gather(1, top[..., None].expand(b, n, 2))
    offs = space.refine_offsets
    rots = (rot_top[..., None] + offs) % n_fine  # (B, N, J)
    j = offs.numel()
    g = flat[top[..., None] * n_fine + rots].reshape(b * n, j, -1)  # (B·N, J, Fa)
    p_top = (wx[:, None, :] * phases(sh_top)).reshape(b * n, 1, -1)  # (B·N, 1, Fa)
    wc2_rep = wc2.repeat_interleave(n, 0)
    s_rot = (2.0 * _cross(p_top, g)[:, 0] - _norm(wc2_rep, g)).reshape(b, n, j)
    s_here = s2.gather(1, top)
    all_rot = torch.cat((s_here[..., None], s_rot), -1)  # (B, N, 1+J)
    j_best = all_rot.argmax(-1)
    rot_best = torch.where(j_best == 0, rot_top,
                           rots.gather(2, (j_best - 1).clamp(min=0)[..., None])[..., 0])
    del g
    g = flat[top * n_fine + rot_best].reshape(b * n, 1, -1)  # (B·N, 1, Fa)
    cand = sh_top[:, :, None, :] + _NEIGHBOURS.to(x.device)  # (B, N, 9, 2)
    p_nb = (wx[:, None, None, :] * phases(cand)).reshape(b * n, 9, -1)
    s_sh = (2.0 * _cross(p_nb, g)[..., 0] - _norm(wc2_rep, g)).reshape(b, n, 9)
    i_best = s_sh.argmax(-1)
    shift_best = cand.gather(2, i_best[..., None, None].expand(b, n, 1, 2))[:, :, 0]
    pose_scores = torch.cat((all_rot, s_sh), -1)

    loglik = s2.clone()
    if force_max:
        refined = pose_scores.max(-1).values
    else:
        # uniform prior over the evaluated poses; temperature as for classes
        refined = annealing * torch.logsumexp(pose_scores / annealing, -1)
    loglik.scatter_(1, top, refined)
    return SearchResult(loglik, top, rot_best, shift_best.float(), pose_scores)
