"""Fourier filters used by the simulator and the scorer (radial band-pass, low-pass)."""

from __future__ import annotations

import math

import torch


def radial_frequency(box: int, pixel_size_A: float) -> torch.Tensor:
    """``(D, D//2 + 1)`` spatial frequency in 1/Å of each rfft2 coefficient."""
    fy = torch.fft.fftfreq(box)
    fx = torch.fft.rfftfreq(box)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / pixel_size_A


def bandpass(
    images: torch.Tensor,
    pixel_size_A: float,
    low_res_A: float | None,
    high_res_A: float | None,
    edge_fraction: float = 0.1,
) -> torch.Tensor:
    """Keep resolutions between ``low_res_A`` (coarse) and ``high_res_A`` (fine), in Å.

    Raised-cosine edges ``edge_fraction`` wide (in frequency) on each side;
    ``None`` leaves that side open (the mean is kept only when ``low_res_A`` is None).
    """
    box = images.shape[-1]
    f = radial_frequency(box, pixel_size_A)
    w = torch.ones_like(f)
    if high_res_A is not None:
        f_hi = 1.0 / high_res_A
        width = edge_fraction * f_hi
        t = ((f - f_hi) / width + 0.5).clamp(0, 1)
        w = w * 0.5 * (1 + torch.cos(math.pi * t))
    if low_res_A is not None:
        f_lo = 1.0 / low_res_A
        width = max(edge_fraction * f_lo, 1.0 / (box * pixel_size_A))
        t = ((f_lo - f) / width + 0.5).clamp(0, 1)
        w = w * 0.5 * (1 + torch.cos(math.pi * t))
    dft = torch.fft.rfftn(images, dim=(-2, -1)) * w
    return torch.fft.irfftn(dft, dim=(-2, -1), s=(box, box))
