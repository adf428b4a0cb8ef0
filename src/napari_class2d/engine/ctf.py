"""CTF values at the kept frequencies (torch-ctf), in the RELION sign convention.

RELION stores defocus in Å with underfocus positive; torch-ctf takes µm. With
torch-ctf's convention the CTF is ``+Q`` at zero frequency and positive in its
first lobe (white particles stay white), as in RELION; the astigmatism angle is
RELION's ``rlnDefocusAngle`` (degrees from the x axis to the defocus-U axis).
``tests/test_engine_ctf.py`` pins this against an independent formula.
"""

from __future__ import annotations

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
    if torch.any(bfac != 0):
        s2 = (grid.radius / (grid.box * pixel_size_A)) ** 2  # 1/Å^2
        ctf = ctf * torch.exp(-bfac[:, None] * s2[None, :] / 4.0)
    return ctf.float()
