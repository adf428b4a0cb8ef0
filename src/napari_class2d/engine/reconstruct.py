"""M-step pieces: back-rotating particle contributions, the Wiener filter with the
CTF, clamp-solvent, masks, re-centring and per-class FRC resolution."""

from __future__ import annotations

import torch

from napari_class2d.engine.ctf import ctf_at
from napari_class2d.engine.fourier import FourierGrid, turned_back


def back_rotate(values: torch.Tensor, angles_deg: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """Turn coefficients seen at in-plane angle ψ back to the class frame.

    A contribution ``ν(f)`` of a particle at angle ψ estimates ``Â(R_{-ψ} f)``;
    the class frame needs ``ν(R_ψ g)`` (:func:`~napari_class2d.engine.fourier.turned_back`).
    ``values``: ``(M, F)`` complex; ``angles_deg``: ``(M,)``.
    """
    return turned_back(values, angles_deg, grid)


def rotated_ctf_weight(
    params: torch.Tensor,
    angles_deg: torch.Tensor,
    grid: FourierGrid,
    pixel_size_A: float,
    mode: str,
    bfactor: bool | None = None,
) -> torch.Tensor:
    """Wiener denominator contribution in the class frame for particles at angle ψ.

    ``CTF(R_ψ g)`` is the CTF with its astigmatism angle turned by ``-ψ``, so it is
    evaluated exactly rather than interpolated. Returns ``CTF²`` (full), ``|CTF|``
    (phase flip) or 1 (off), ``(M, F)``. ``bfactor``: as for :func:`ctf_at`.
    """
    if mode == "off":
        return torch.ones((params.shape[0], grid.n), device=params.device)
    p = params.clone()
    p[:, 2] = p[:, 2] - angles_deg
    c = ctf_at(p, grid, pixel_size_A, bfactor)
    return c * c if mode == "full" else c.abs()


def class_power(images: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """Ring-averaged power ``|Â|²`` of real images ``(..., D, D)`` -> ``(..., rings)``."""
    return grid.ring_average(grid.forward(images).abs() ** 2)


def signal_prior(
    num: torch.Tensor,
    den: torch.Tensor,
    grid: FourierGrid,
    regularisation: float,
    power: torch.Tensor,
    falling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal variance ``τ²`` per class and ring, and the half-set FRC.

    Two estimates of each class's signal power, the smaller one is used:

    * RELION's classification prior, ``T · P``: ``P`` is the ring power of the class's
      current (masked) average. It shrinks every frequency at which the class has
      shown no signal yet, and a frequency holding only noise decays from iteration to
      iteration, so classes grow from smooth blobs instead of locking onto noise.
    * The half-set estimate, ``T · SSNR · <1/den>`` with ``SSNR = FSC/(1 - FSC)`` and
      ``FSC = 2 FRC/(1 + FRC)`` from the two half-set averages ``num_h / den_h``
      (``<1/den>``: the noise variance of the unregularised average). Once the classes
      are real it is the sharper estimate; while both halves are aligned to the same
      noisy references it is biased upwards, which the first estimate caps.

    Parameters
    ----------
    num, den
        ``(2, K, F)`` half-set statistics (complex, real).
    regularisation
        RELION's T: weight of the data against the prior.
    power
        ``(K, rings)`` ring power of the classes' current averages.
    falling
        Estimate the half-set signal from the FRC made to fall with frequency
        (:func:`falling_frc`): for jobs that do not correct the CTF.

    Returns
    -------
    tuple
        ``τ²`` ``(K, rings)`` and the half-set FRC ``(K, rings)``.
    """
    half_set, frc = half_set_signal(num, den, grid, regularisation, falling)
    tau2 = torch.minimum(half_set, regularisation * power)
    return tau2.clamp(min=1e-30), frc


def half_set_signal(
    num: torch.Tensor,
    den: torch.Tensor,
    grid: FourierGrid,
    regularisation: float,
    falling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-set estimate of the signal variance, ``T · SSNR · <1/den>`` per class and
    ring (see :func:`signal_prior`), and the half-set FRC as measured; both ``(K, rings)``.
    With ``falling`` the SSNR comes from the FRC made to fall with frequency
    (:func:`falling_frc`).

    Alone it is the Wiener filter of the class averages shown and written
    (``Class2DModel.averages``): the classification prior of :func:`signal_prior` also
    shrinks frequencies the class holds but has not yet shown, which leaves the
    averages blurrier than their particles and poses allow (on the ribosome benchmark
    the same final poses gave 11/14 views with it and 14/14 with this filter).
    """
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    frc = half_set_frc(num, den, grid)
    r = frc.clamp(1e-4, 0.999)
    if falling:
        r = falling_frc(r)
    fsc = 2 * r / (1 + r)
    ssnr = fsc / (1 - fsc)
    noise = grid.ring_average(1.0 / den.sum(0).clamp(min=eps))
    return (regularisation * ssnr * noise).clamp(min=1e-30), frc


def falling_frc(frc: torch.Tensor) -> torch.Tensor:
    """The FRC ``(..., rings)`` made non-increasing from ring :data:`FIRST_RING` on: each
    ring at most the lowest value of the rings from ``FIRST_RING`` to it (the rings below
    hold a handful of coefficients and stay as they are).

    Without a CTF in the data (denoised micrographs, negative stain: the jobs run with the
    CTF off), the particles of a class agree best at low resolution, so its half sets'
    FRC falls with frequency. A class whose
    halves agree on fine detail but not on the coarse shape agrees on a pattern both were
    aligned to: on 600 real β-galactosidase particles (CTF off) a class of 31 reached an
    FRC of 0.7-0.9 from 40 to 13 Å with 0.0 at 118 and 59 Å, and the Wiener filter made a
    noise texture of it. Not for CTF-corrected jobs: where the CTF is weak (the lowest
    rings) the halves of a real class agree less than at the CTF's first maximum, and the
    rule would cut their signal (a small synthetic job with a CTF fell from purity 0.95 to
    0.69 with it). Raw images classified with the CTF off have that dip too, and the rule
    then low-passes their classes where their FRC first dips.
    """
    if frc.shape[-1] <= FIRST_RING:
        return frc
    tail = torch.cummin(frc[..., FIRST_RING:], dim=-1).values
    return torch.cat([frc[..., :FIRST_RING], tail], -1)


def regularised_average(
    num: torch.Tensor, den: torch.Tensor, tau2: torch.Tensor, grid: FourierGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num / (den + 1/τ²)`` and ``1/τ²`` per coefficient; ``τ²``: ``(..., rings)``."""
    inv_tau2 = (1.0 / tau2)[..., grid.ring]
    return num / (den + inv_tau2), inv_tau2


def current_radius(
    dvp: torch.Tensor, populated: torch.Tensor, increment: float, max_radius: float
) -> float:
    """Search radius (cycles per box): per class, the last ring before its ``dvp`` (its
    spectral SNR times T, RELION's ``data_vs_prior``) stays below 1 (two rings in a row,
    from ring :data:`FIRST_RING` on: the lowest rings hold a handful of coefficients and
    their estimates are noise); over the populated classes the upper quartile
    (:data:`RADIUS_QUANTILE`) of these rings, plus ``increment`` shells, at most
    ``max_radius``.

    The upper quartile rather than RELION's maximum: the half-set SSNR of a small class
    aligned to its own noisy reference is biased upwards, and on real particles (the
    β-galactosidase benchmark) one such class opened the full band to every class and
    fitted a noise texture; most classes must show signal before the band grows.

    ``dvp``: ``(K, rings)``; ``populated``: ``(K,)`` bool.
    """
    n = dvp.shape[-1]
    rings = torch.arange(n, device=dvp.device)
    below = (dvp < 1.0) & (rings >= FIRST_RING)
    stays = below & torch.cat([below[:, 1:], torch.ones_like(below[:, :1])], 1)
    first = torch.where(stays.any(-1), stays.float().argmax(-1), torch.full_like(rings[:1], n))
    last_good = (first - 1).clamp(min=FIRST_RING - 1).float()
    if bool(populated.any()):
        last_good = last_good[populated]
    radius = float(torch.quantile(last_good, RADIUS_QUANTILE))
    return float(min(max_radius, radius + increment))


#: the search radius follows this quantile of the populated classes' radii (see current_radius)
RADIUS_QUANTILE = 0.75

#: rings below this are not used to decide the search radius (see current_radius)
FIRST_RING = 3


def orientable_ssnr(num: torch.Tensor, den: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """Spectral SNR ``(K, rings)`` of the part of each class average that is not round.

    The half-set averages ``num_h / den_h`` less their rotational averages (the ring
    means of their transforms), compared by their FRC (``SSNR = FSC/(1 - FSC)``). A round
    component common to all particles (the mean particle, a halo, a mask edge) carries
    no in-plane angle and no class, however well it is measured; only the rest can
    align and separate particles.
    """
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    halves = num / den.clamp(min=eps)
    halves = halves - grid.ring_average(halves).real[..., grid.ring]
    a, b = halves[0], halves[1]
    cross = grid.ring_average((a * b.conj()).real)
    norm = torch.sqrt(grid.ring_average(a.abs() ** 2) * grid.ring_average(b.abs() ** 2))
    r = (cross / norm.clamp(min=1e-30)).clamp(1e-4, 0.999)
    fsc = 2 * r / (1 + r)
    return fsc / (1 - fsc)


def half_set_frc(num: torch.Tensor, den: torch.Tensor, grid: FourierGrid) -> torch.Tensor:
    """FRC ``(K, rings)`` of the two unregularised half-set averages ``num_h / den_h``."""
    eps = 1e-6 * den.mean().clamp(min=1e-30)
    halves = num / den.clamp(min=eps)
    a, b = halves[0], halves[1]
    cross = grid.ring_average((a * b.conj()).real)
    norm = torch.sqrt(grid.ring_average(a.abs() ** 2) * grid.ring_average(b.abs() ** 2))
    return cross / norm.clamp(min=1e-30)


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
