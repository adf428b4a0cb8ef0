"""CTF values at the kept frequencies (torch-ctf), in the RELION sign convention.

RELION stores defocus in Å with underfocus positive; torch-ctf takes µm. With
torch-ctf's convention the CTF is ``+Q`` at zero frequency and positive in its
first lobe (white particles stay white), as in RELION; the astigmatism angle is
RELION's ``rlnDefocusAngle`` (degrees from the x axis to the defocus-U axis).
``tests/test_engine_ctf.py`` pins this against an independent formula.
"""

from __future__ import annotations

import math

import torch
from torch_ctf import calculate_ctf_2d

from napari_class2d.engine.fourier import FourierGrid

#: columns of the per-particle CTF parameter array kept by the particle pool
CTF_COLUMNS = (
    "defocus_u_A",
    "defocus_v_A",
    "astigmatism_angle_deg",
    "voltage_kV",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_deg",
    "bfactor_A2",
)


def ctf_values(params: torch.Tensor, grid: FourierGrid, pixel_size_A: float) -> torch.Tensor:
    """CTF at the kept frequencies.

    Parameters
    ----------
    params
        ``(B, 8)`` float32 rows in the order of :data:`CTF_COLUMNS` (Å, degrees, kV, mm).
    grid
        Frequencies at the working box.
    pixel_size_A
        Working pixel size in Å.

    Returns
    -------
    torch.Tensor
        ``(B, F)`` real CTF values.
    """
    du, dv, ang, kv, cs, q, phase, bfac = params.T
    # torch-ctf needs defocus U >= V (it takes a square root of the astigmatism);
    # U < V is the same CTF with the axes swapped
    swap = du < dv
    du, dv = torch.where(swap, dv, du), torch.where(swap, du, dv)
    ang = torch.where(swap, ang + 90.0, ang)
    ctf = calculate_ctf_2d(
        defocus=(du + dv) / 2e4,
        astigmatism=(du - dv) / 2e4,
        astigmatism_angle=ang,
        voltage=kv,
        spherical_aberration=cs,
        amplitude_contrast=q,
        phase_shift=phase,
        pixel_size=pixel_size_A,
        image_shape=(grid.box, grid.box),
        rfft=True,
        fftshift=False,
    )
    ctf = ctf.reshape(params.shape[0], grid.box, grid.box // 2 + 1)[:, grid.rows, grid.cols]
    if bfac.is_cuda or bool(torch.any(bfac != 0)):  # (exp(0) = 1: cheaper than a GPU sync)
        s2 = (grid.radius / (grid.box * pixel_size_A)) ** 2  # 1/Å^2
        ctf = ctf * torch.exp(-bfac[:, None] * s2[None, :] / 4.0)
    return ctf.float()


def electron_wavelength_A(voltage_kV: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    volts = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf_at(
    params: torch.Tensor, grid: FourierGrid, pixel_size_A: float, bfactor: bool | None = None
) -> torch.Tensor:
    """The same CTF as :func:`ctf_values`, evaluated directly at the kept frequencies.

    Used where the CTF must be re-evaluated for many particles every iteration
    (the M-step needs it with the astigmatism angle turned by each particle's
    in-plane angle); evaluating only the kept frequencies is several times
    faster than rendering full grids. ``tests/test_engine_ctf.py`` checks it
    against :func:`ctf_values` (torch-ctf). ``bfactor``: whether any particle has a
    B-factor, when the caller knows (None: looked up in ``params``, a device sync).
    """
    du, dv, ang, kv, cs, q, phase, bfac = (c[:, None] for c in params.T)
    kx = grid.kx / (grid.box * pixel_size_A)
    ky = grid.ky / (grid.box * pixel_size_A)
    k2 = kx * kx + ky * ky
    phi = torch.atan2(ky, kx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (phi - torch.deg2rad(ang)))
    lam = electron_wavelength_A(kv)
    chi = math.pi * lam * df * k2 - 0.5 * math.pi * cs * 1e7 * lam**3 * k2 * k2
    chi = chi + torch.deg2rad(phase) + torch.atan2(q, torch.sqrt((1 - q * q).clamp(min=0)))
    ctf = torch.sin(chi)
    if bfactor is None:  # (exp(0) = 1: cheaper than a GPU sync)
        bfactor = bfac.is_cuda or bool(torch.any(bfac != 0))
    if bfactor:
        ctf = ctf * torch.exp(-bfac * k2 / 4.0)
    return ctf
