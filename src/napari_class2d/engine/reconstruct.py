"""M-step pieces: back-rotating particle contributions, the Wiener filter with the
CTF, clamp-solvent, masks, re-centring and per-class FRC resolution."""

from __future__ import annotations

import torch

from napari_class2d.engine.ctf import ctf_at
from napari_class2d.engine.fourier import FourierGrid, rotate_images


def back_rotate(values: torch.Tensor, angles_deg: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """Turn coefficients seen at in-plane angle ψ back to the class frame.

    A contribution ``ν(f)`` of a particle at angle ψ estimates ``Â(R_{-ψ} f)``;
    the class frame needs ``ν(R_ψ g)``: rotate its real-space image by ``-ψ``
    (bicubic) and transform again. ``values``: ``(M, F)`` complex; ``angles_deg``: ``(M,)``.
    """
    images = grid.inverse(values)
    return grid.forward(rotate_images(images, -angles_deg, mode="bicubic"))


def rotated_ctf_weight(
    params: torch.Tensor,
    angles_deg: torch.Tensor,
    grid: FourierGrid,
    pixel_size_A: float,
    mode: str,
) -> torch.Tensor:
    """Wiener denominator contribution in the class frame for particles at angle ψ.

    ``CTF(R_ψ g)`` is the CTF with its astigmatism angle turned by ``-ψ``, so it is
    evaluated exactly rather than interpolated. Returns ``CTF²`` (full), ``|CTF|``
    (phase flip) or 1 (off), ``(M, F)``.
    """
    if mode == "off":
        return torch.ones((params.shape[0], grid.n), device=params.device)
    p = params.clone()
    p[:, 2] = p[:, 2] - angles_deg
    c = ctf_at(p, grid, pixel_size_A)
    return c * c if mode == "full" else c.abs()


def wiener(
    num: torch.Tensor, den: torch.Tensor, grid: FourierGrid, regularisation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularised class averages ``num / (den + 1/τ²)`` and the prior ``1/τ²``.

    ``τ²`` per class and ring is ``regularisation`` (RELION's T) times the signal
    power estimated from the data: ``<|num/den|²> - <1/den>`` over the ring.
    ``num``: ``(..., K, F)`` complex, ``den``: same shape, real.
    """
    safe = den.clamp(min=1e-6 * den.mean().clamp(min=1e-30))
    power = grid.ring_average((num.abs() ** 2) / safe**2) - grid.ring_average(1.0 / safe)
    floor = 1e-3 * power.clamp(min=0).amax(-1, keepdim=True).clamp(min=1e-20)
    tau2 = regularisation * torch.maximum(power, floor)
    inv_tau2 = (1.0 / tau2)[..., grid.ring]
    return num / (den + inv_tau2), inv_tau2


def clamp_solvent(
    num: torch.Tensor,
    den: torch.Tensor,
    inv_tau2: torch.Tensor,
    support: torch.Tensor,
    grid: FourierGrid,
    start: torch.Tensor,
    n_iter: int = 12,
) -> torch.Tensor:
    """Class averages that minimise the Wiener objective with zero density outside ``support``.

    Solves ``min_a Σ_f (den + 1/τ²)|â|² - 2 Re conj(â)·num`` over images ``a`` that
    vanish outside ``support`` (``(D, D)`` bool) by conjugate gradients, batched
    over classes. ``start``: ``(K, D, D)`` initial images. Returns ``(K, D, D)``.
    """
    h = den + inv_tau2

    def apply(a: torch.Tensor) -> torch.Tensor:
        return grid.inverse(h * grid.forward(a)) * support

    b = grid.inverse(num) * support
    a = start * support
    r = b - apply(a)
    p = r.clone()
    rs = (r * r).sum((-2, -1))
    for _ in range(n_iter):  # CG iterations, each batched over all classes
        hp = apply(p)
        alpha = rs / (p * hp).sum((-2, -1)).clamp(min=1e-30)
        a = a + alpha[:, None, None] * p
        r = r - alpha[:, None, None] * hp
        rs_new = (r * r).sum((-2, -1))
        p = r + (rs_new / rs.clamp(min=1e-30))[:, None, None] * p
        rs = rs_new
    return a


def centre_of_mass_shift(images: torch.Tensor, threshold: float, binary: bool) -> torch.Tensor:
    """Shift (x, y) px that moves each image's centre of mass to the box centre.

    Only pixels above ``threshold * max`` count; ``binary`` weights them equally.
    ``images``: ``(K, D, D)`` -> ``(K, 2)``.
    """
    d = images.shape[-1]
    peak = images.amax((-2, -1), keepdim=True)
    above = images > threshold * peak
    w = above.float() if binary else images.clamp(min=0) * above
    total = w.sum((-2, -1)).clamp(min=1e-12)
    c = torch.arange(d, device=images.device, dtype=torch.float32) - d // 2
    cx = (w * c[None, None, :]).sum((-2, -1)) / total
    cy = (w * c[None, :, None]).sum((-2, -1)) / total
    shift = -torch.stack((cx, cy), -1)
    shift[(peak.flatten() <= 0)] = 0
    return shift


def frc_resolution(
    a: torch.Tensor,
    b: torch.Tensor,
    grid: FourierGrid,
    pixel_size_A: float,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class FRC of two half-set averages and the resolution (Å) where it drops below 0.5.

    ``a, b``: ``(K, F)`` complex. Returns ``(frc (K, rings), resolution (K,))``;
    the resolution is ``inf`` when even the first ring is below the threshold.
    """
    num = grid.ring_average((a * b.conj()).real)
    den = torch.sqrt(grid.ring_average(a.abs() ** 2) * grid.ring_average(b.abs() ** 2))
    frc = num / den.clamp(min=1e-30)
    rings = torch.arange(grid.n_rings, device=a.device)
    below = (frc < threshold) & (rings >= 1)
    first = torch.where(
        below.any(-1),
        below.float().argmax(-1),
        torch.full_like(below[:, 0], grid.n_rings - 1, dtype=torch.long),
    )
    last_good = (first - 1).clamp(min=0).float()
    res = torch.where(
        last_good > 0,
        grid.box * pixel_size_A / last_good.clamp(min=1),
        torch.full_like(last_good, float("inf")),
    )
    return frc, res
