"""Image-to-image matching: best in-plane rotation and shift between two sets of images.

Qt-free and engine-free, for judging class averages against references (the real-data
benchmark) and for class similarity in selection. Every image of one set is matched
with every image of the other, batched: the references are turned over a grid of
in-plane angles once, and each (image, reference, angle) triple is scored over all
shifts at once by an FFT cross-correlation.

The pose follows :func:`napari_class2d.sim.transforms.rotate_and_shift` (and RELION):
with ``x = (column - D//2, row - D//2)`` in pixels and ``t = shift_A / pixel_size_A``,
the match of reference ``m`` to image ``n`` is

    image_n(x) ~ reference_m(R(psi) @ (x - t)),   R(psi) = [[cos psi, -sin psi],
                                                            [sin psi,  cos psi]]

so ``rotate_and_shift(reference_m, psi, shift_A, pixel_size_A)`` lies on ``image_n``.
No mirroring (2D classes are never mirrored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageMatch:
    """Best pose of every reference on every image.

    Attributes
    ----------
    score
        ``(N, M)`` normalised cross-correlation in [-1, 1] of image ``n`` with reference
        ``m`` in its best pose, both band-passed and masked.
    psi_deg
        ``(N, M)`` in-plane angle of the best pose, degrees in [0, 360).
    shift_A
        ``(N, M, 2)`` shift ``(x, y)`` of the best pose, Å.
    """

    score: torch.Tensor
    psi_deg: torch.Tensor
    shift_A: torch.Tensor


def bandpass_weights(
    box: int,
    pixel_size_A: float,
    band_A: tuple[float | None, float | None],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(D, D//2 + 1)`` rfft2 weights keeping resolutions from ``band_A[0]`` to ``band_A[1]`` Å.

    Raised-cosine edges 10 % of the cut-off frequency wide (at least one Fourier pixel on the
    low side); ``None`` leaves that side open. The origin is dropped whenever the low side is
    set.
    """
    low_A, high_A = band_A
    fy = torch.fft.fftfreq(box, device=device)
    fx = torch.fft.rfftfreq(box, device=device)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / pixel_size_A  # 1/Å
    w = torch.ones_like(f)
    if high_A is not None:
        f_hi = 1.0 / high_A
        t = ((f - f_hi) / (0.1 * f_hi) + 0.5).clamp(0, 1)
        w = w * 0.5 * (1 + torch.cos(math.pi * t))
    if low_A is not None:
        f_lo = 1.0 / low_A
        width = max(0.1 * f_lo, 1.0 / (box * pixel_size_A))
        t = ((f_lo - f) / width + 0.5).clamp(0, 1)
        w = w * 0.5 * (1 + torch.cos(math.pi * t))
        w[0, 0] = 0.0
    return w


def soft_disc(box: int, diameter_px: float, edge_px: float, device="cpu") -> torch.Tensor:
    """``(D, D)`` disc: 1 inside ``diameter_px / 2``, raised-cosine fall-off over ``edge_px``."""
    c = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    t = ((r - 0.5 * diameter_px) / max(edge_px, 1e-6)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def _normalise_in(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked, zero mean under the mask, unit norm (blank images stay zero)."""
    x = x * mask
    mean = x.sum(dim=(-2, -1), keepdim=True) / mask.sum()
    x = (x - mean) * mask
    return x / x.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]


def _crop_rfft(ft: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the ``size x (size//2 + 1)`` lowest frequencies of a ``(..., D, D//2 + 1)`` rfft2."""
    box = ft.shape[-2]
    if size >= box:
        return ft
    h = size // 2
    return torch.cat((ft[..., :h, : h + 1], ft[..., box - h :, : h + 1]), dim=-2)


def _rotation_grid(angles_deg: torch.Tensor, box: int, big: int) -> torch.Tensor:
    """``grid_sample`` grid ``(1, R*D, D, 2)`` sampling ``img(R(psi) @ x)`` from a ``big`` box."""
    factor = big / box
    psi = torch.deg2rad(angles_deg.float())
    c, s = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
    r = torch.arange(box, dtype=torch.float32, device=angles_deg.device) - box // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    ux = (c * x - s * y) * factor + big // 2
    uy = (s * x + c * y) * factor + big // 2
    grid = torch.stack((ux, uy), dim=-1) * (2.0 / (big - 1)) - 1.0  # align_corners=True
    return grid.reshape(1, -1, box, 2)


def _vertex(a, b, c, a_ok=None, c_ok=None):
    """Offset (within half a step) and gain over ``b`` of the parabola through values at -1, 0, 1.

    The parabola is evaluated at the clamped offset, so a nearly flat triple (a round
    reference turned) cannot blow up the height; it is not followed towards a neighbour
    outside the allowed range (``a_ok``, ``c_ok``), so an edge peak stays on the edge.
    """
    den = a - 2 * b + c
    ok = den < -1e-12
    off = torch.where(ok, 0.5 * (a - c) / torch.where(ok, den, -1.0), 0.0).clamp(-0.5, 0.5)
    if a_ok is not None:
        off = torch.where(((off < 0) & ~a_ok) | ((off > 0) & ~c_ok), 0.0, off)
    gain = 0.5 * (c - a) * off + 0.5 * den * off**2
    return off, torch.where(ok, gain, 0.0).clamp(min=0.0)


def _peak(cc: torch.Tensor, allowed: torch.Tensor):
    """Highest allowed value of ``(..., S, S)`` maps, refined by a parabola along x and y.

    The neighbours of the peak are read from the map as it is (a disallowed neighbour is not
    a -2 that would inflate an edge peak). Returns the refined height and the peak
    position ``(x, y)`` in signed grid steps.
    """
    size = cc.shape[-1]
    lead = cc.shape[:-2]
    raw = cc.reshape(-1, size, size)
    best, where = raw.masked_fill(~allowed, -2.0).flatten(1).max(dim=1)
    iy, ix = where // size, where % size
    k = torch.arange(raw.shape[0], device=cc.device)

    left, right, up, down = (ix - 1) % size, (ix + 1) % size, (iy - 1) % size, (iy + 1) % size
    dx, gx = _vertex(
        raw[k, iy, left], best, raw[k, iy, right], allowed[iy, left], allowed[iy, right]
    )
    dy, gy = _vertex(raw[k, up, ix], best, raw[k, down, ix], allowed[up, ix], allowed[down, ix])
    r = torch.fft.fftfreq(size, device=cc.device) * size
    height = (best + gx + gy).clamp(max=1.0)
    return height.reshape(lead), (r[ix] + dx).reshape(lead), (r[iy] + dy).reshape(lead)


def match_images(
    images: torch.Tensor,
    references: torch.Tensor,
    pixel_size_A: float,
    *,
    mask_diameter_A: float | None = None,
    band_A: tuple[float | None, float | None] = (100.0, 15.0),
    rotation_step_deg: float = 3.0,
    max_shift_A: float | None = None,
    memory_budget_MB: float = 256.0,
) -> ImageMatch:
    """Best in-plane rotation and shift of every reference on every image.

    Both sets are band-passed to ``band_A`` (coarse, fine; Å), multiplied by a soft
    circular mask of ``mask_diameter_A`` and normalised (zero mean, unit norm under the
    mask). Each reference is turned over ``rotation_step_deg`` steps (bicubic
    interpolation of the 2x Fourier-upsampled image); each turned copy is correlated with
    every image over all shifts up to ``max_shift_A`` by FFT, on a grid Fourier-cropped to
    the band (1.5x oversampled); the peak is refined by parabolas in x, y and angle.

    Parameters
    ----------
    images, references
        ``(N, D, D)`` and ``(M, D, D)`` images on the same grid, ``D`` even.
    pixel_size_A
        Pixel size of both sets, Å.
    mask_diameter_A
        Diameter of the soft circular mask, Å (``None``: 80 % of the box); its raised-cosine
        edge is 5 % of the box wide, outside this diameter.
    band_A
        ``(low, high)`` resolutions in Å (``None`` leaves that side open).
    rotation_step_deg
        Step of the in-plane angle grid, degrees.
    max_shift_A
        Largest shift searched, Å (``None``: an eighth of the box).
    memory_budget_MB
        About how much memory the correlations of one chunk may take.

    Returns
    -------
    ImageMatch
        Scores, angles and shifts ``(N, M)``. The score is the normalised cross-correlation
        of the two prepared images, so identical images score 1 and blank ones 0.
    """
    images = torch.as_tensor(images).float()
    references = torch.as_tensor(references).float().to(images.device)
    if images.ndim != 3 or references.ndim != 3:
        raise ValueError("images and references must be (N, D, D) and (M, D, D)")
    box = images.shape[-1]
    if images.shape[-2:] != (box, box) or references.shape[-2:] != (box, box) or box % 2:
        raise ValueError(
            f"images {tuple(images.shape)} and references {tuple(references.shape)} must be "
            "square, the same even size"
        )
    dev = images.device
    N, M = images.shape[0], references.shape[0]
    mask_px = 0.8 * box if mask_diameter_A is None else mask_diameter_A / pixel_size_A
    mask = soft_disc(box, mask_px, 0.05 * box, device=dev)
    weights = bandpass_weights(box, pixel_size_A, band_A, device=dev)
    max_shift_px = box / 8 if max_shift_A is None else max_shift_A / pixel_size_A

    # correlation grid: the band's finest frequency, 1.5x oversampled
    if band_A[1] is None:
        size = box
    else:
        k_max = box * pixel_size_A / band_A[1]
        size = min(box, max(16, 2 * math.ceil(1.5 * k_max)))
    step_px = box / size  # shift of one correlation-grid step, pixels
    r = torch.fft.fftfreq(size, device=dev) * size * step_px
    allowed = (r[:, None] ** 2 + r[None, :] ** 2) <= max_shift_px**2 + 1e-6
    scale = size * size / float(box * box)  # irfft at `size` of a box-`box` product

    def spectrum(x: torch.Tensor) -> torch.Tensor:
        return _crop_rfft(torch.fft.rfftn(x, dim=(-2, -1)), size)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(torch.fft.rfftn(x, dim=(-2, -1)) * weights, s=(box, box))

    f_img = spectrum(_normalise_in(filt(images), mask))  # (N, S, S//2+1)

    n_rot = max(1, round(360.0 / rotation_step_deg))
    angles = torch.arange(n_rot, device=dev, dtype=torch.float32) * (360.0 / n_rot)
    big = 2 * box
    grid = _rotation_grid(angles, box, big)
    # references band-passed, then 2x Fourier-upsampled for the interpolation
    ref_ft = torch.fft.rfftn(references, dim=(-2, -1)) * weights
    up = torch.zeros((M, big, big // 2 + 1), dtype=ref_ft.dtype, device=dev)
    h = box // 2
    up[:, :h, : h + 1] = ref_ft[:, :h, : h + 1]
    up[:, big - h :, : h + 1] = ref_ft[:, box - h :, : h + 1]
    ref_up = torch.fft.irfftn(up, dim=(-2, -1), s=(big, big)) * 4.0

    score = torch.empty((N, M), device=dev)
    psi = torch.empty((N, M), device=dev)
    shift = torch.empty((N, M, 2), device=dev)
    bytes_per_pair = n_rot * size * size * 4 * 3  # product (complex) + correlation maps
    pairs = max(1, int(memory_budget_MB * 2**20 // bytes_per_pair))
    m_chunk = max(1, min(M, 32, pairs))
    n_chunk = max(1, min(N, pairs // m_chunk))
    for m0 in range(0, M, m_chunk):
        refs = ref_up[m0 : m0 + m_chunk]
        mc = refs.shape[0]
        turned = F.grid_sample(
            refs[None], grid, mode="bicubic", padding_mode="zeros", align_corners=True
        )[0].reshape(mc, n_rot, box, box)
        f_ref = spectrum(_normalise_in(turned, mask)).conj()  # (mc, R, S, S//2+1)
        for n0 in range(0, N, n_chunk):
            fi = f_img[n0 : n0 + n_chunk]
            nc = fi.shape[0]
            cc = torch.fft.irfftn(fi[:, None, None] * f_ref[None], dim=(-2, -1), s=(size, size))
            cc = cc.mul_(scale).masked_fill_(~allowed, -2.0)
            per_angle = cc.flatten(-2).max(dim=-1).values  # (nc, mc, R)
            best_r = per_angle.argmax(dim=-1)  # (nc, mc)
            # the best angle and its two neighbours, each peak refined in x and y; then the
            # angle refined by a parabola through the three heights
            mi = torch.arange(mc, device=dev)[None, :, None]
            near = (best_r[..., None] + torch.arange(-1, 2, device=dev)) % n_rot  # (nc, mc, 3)
            cc3 = torch.fft.irfftn(
                fi[:, None, None] * f_ref[mi, near], dim=(-2, -1), s=(size, size)
            )
            height3, sx3, sy3 = _peak(cc3 * scale, allowed)  # (nc, mc, 3)
            a, b, c = height3.unbind(-1)
            off, gain = _vertex(a, b, c)
            height = (b + gain).clamp(max=1.0)
            sx, sy = sx3[..., 1], sy3[..., 1]
            score[n0 : n0 + nc, m0 : m0 + mc] = height
            psi[n0 : n0 + nc, m0 : m0 + mc] = (angles[best_r] + off * (360.0 / n_rot)) % 360.0
            shift[n0 : n0 + nc, m0 : m0 + mc, 0] = sx * step_px * pixel_size_A
            shift[n0 : n0 + nc, m0 : m0 + mc, 1] = sy * step_px * pixel_size_A
    return ImageMatch(score=score, psi_deg=psi, shift_A=shift)
