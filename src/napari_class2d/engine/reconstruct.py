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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regularised class averages ``num / (den + 1/τ²)`` with τ² from the half-set FRC.

    The two half-set averages ``num_h / den_h`` give each class's FRC per ring; the
    full set's spectral SNR is ``SSNR = FSC/(1 - FSC)`` with ``FSC = 2 FRC/(1 + FRC)``,
    and ``τ² = T · SSNR · <1/den>`` (``<1/den>``: the noise variance of the
    unregularised average), so the filter is the Wiener filter of the measured SNR.
    Rescaling the noise model leaves the averages unchanged, so a noise estimate that
    over-fits cannot leave noise in the averages.

    Parameters
    ----------
    num, den
        ``(2, K, F)`` half-set statistics (complex, real).
    regularisation
        RELION's T: weight of the data against the prior.

    Returns
    -------
    tuple
        Full average ``(K, F)``, ``1/τ²`` per coefficient ``(K, F)`` and the half-set
        FRC ``(K, rings)``.
    """
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    frc = half_set_frc(num, den, grid)
    total_num, total_den = num.sum(0), den.sum(0)
    r = frc.clamp(1e-4, 0.999)
    fsc = 2 * r / (1 + r)
    ssnr = fsc / (1 - fsc)
    noise = grid.ring_average(1.0 / total_den.clamp(min=eps))
    tau2 = (regularisation * ssnr * noise).clamp(min=1e-30)
    inv_tau2 = (1.0 / tau2)[..., grid.ring]
    return total_num / (total_den + inv_tau2), inv_tau2, frc


def half_set_frc(num: torch.Tensor, den: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """FRC ``(K, rings)`` of the two unregularised half-set averages ``num_h / den_h``."""
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    halves = num / den.clamp(min=eps)
    a, b = halves[0], halves[1]
    cross = grid.ring_average((a * b.conj()).real)
    norm = torch.sqrt(grid.ring_average(a.abs() ** 2) * grid.ring_average(b.abs() ** 2))
    return cross / norm.clamp(min=1e-30)


def half_set_wiener(
    num: torch.Tensor, den: torch.Tensor, grid: FourierGrid, regularisation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each half set's own regularised averages ``num_h / (den_h + 1/τ²_h)``.

    As :func:`wiener`, with the SNR of one half, ``SSNR_h = FRC/(1 - FRC)``, and the
    noise of that half's average. Returns averages and ``1/τ²_h``, both ``(2, K, F)``.
    """
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    r = half_set_frc(num, den, grid).clamp(1e-4, 0.999)
    ssnr = r / (1 - r)
    noise = grid.ring_average(1.0 / den.clamp(min=eps))  # (2, K, rings)
    tau2 = (regularisation * ssnr[None] * noise).clamp(min=1e-30)
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


def resolution_from_frc(
    frc: torch.Tensor, grid: FourierGrid, pixel_size_A: float, threshold: float = 0.5
) -> torch.Tensor:
    """Resolution (Å) of each class: the last ring before its FRC drops below ``threshold``.

    ``frc``: ``(K, rings)``. ``inf`` when even the first ring is below the threshold.
    """
    rings = torch.arange(grid.n_rings, device=frc.device)
    below = (frc < threshold) & (rings >= 1)
    first = torch.where(
        below.any(-1),
        below.float().argmax(-1),
        torch.full_like(below[:, 0], grid.n_rings - 1, dtype=torch.long),
    )
    last_good = (first - 1).clamp(min=0).float()
    return torch.where(
        last_good > 0,
        grid.box * pixel_size_A / last_good.clamp(min=1),
        torch.full_like(last_good, float("inf")),
    )
