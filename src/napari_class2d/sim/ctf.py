"""CTF (RELION convention, via teamtomo ``torch-ctf``) applied on a zero-padded box.

RELION stores defocus in Å (underfocus positive), torch-ctf takes µm; its CTF
is ``+Q`` (amplitude contrast) at zero frequency and positive in the first
lobe, as in RELION, so projections of positive density stay white. The
astigmatism angle is RELION's ``rlnDefocusAngle``: degrees from the image x
axis to the defocus-U axis (``tests/test_sim_ctf.py`` pins both against an
independent formula).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch_ctf import calculate_ctf_2d
from torch_fourier_shift import fourier_shift_dft_2d


def relion_ctf_2d(
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    voltage_kV: float,
    cs_mm: float,
    amplitude_contrast: float,
    pixel_size_A: float,
    box: int,
    phase_shift_deg=0.0,
    rfft: bool = True,
) -> torch.Tensor:
    """CTF images ``(N, D, D//2+1)`` (``rfft``, not fft-shifted) for RELION parameters.

    Requires ``defocus_u_A >= defocus_v_A`` (RELION's usual order; torch-ctf
    takes the square root of the astigmatism).
    """
    du = torch.as_tensor(np.asarray(defocus_u_A, dtype=np.float32)).reshape(-1)
    dv = torch.as_tensor(np.asarray(defocus_v_A, dtype=np.float32)).reshape(-1)
    if bool((du < dv).any()):
        raise ValueError("defocus U must be >= defocus V (swap them and add 90° to the angle)")
    ang = torch.as_tensor(np.asarray(defocus_angle_deg, dtype=np.float32)).reshape(-1)
    phase = torch.as_tensor(np.asarray(phase_shift_deg, dtype=np.float32)).reshape(-1)
    ang, phase = ang.expand_as(du), phase.expand_as(du)
    return calculate_ctf_2d(
        defocus=(du + dv) / 2e4,
        astigmatism=(du - dv) / 2e4,
        astigmatism_angle=ang,
        voltage=voltage_kV,
        spherical_aberration=cs_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift=phase,
        pixel_size=pixel_size_A,
        image_shape=(box, box),
        rfft=rfft,
        fftshift=False,
    ).float()


def shift_and_ctf(
    images: torch.Tensor,
    shift_px: torch.Tensor | None,
    ctf_params: dict | None,
    pixel_size_A: float,
    pad_factor: int = 2,
) -> torch.Tensor:
    """Shift (x, y pixels) and multiply by the CTF on a zero-padded box, then crop.

    Padding keeps the CTF's delocalised signal from wrapping round the box (what
    spreads beyond the box is lost, as when a particle is boxed from a
    micrograph). ``ctf_params`` holds per-image ``defocus_u_A``, ``defocus_v_A``,
    ``defocus_angle_deg`` and scalar ``voltage_kV``, ``cs_mm``,
    ``amplitude_contrast``; ``None`` skips the CTF.
    """
    box = images.shape[-1]
    pad = (pad_factor * box - box) // 2
    x = F.pad(images, [pad] * 4) if pad else images
    big = x.shape[-1]
    dft = torch.fft.rfftn(x, dim=(-2, -1))
    if shift_px is not None:
        shifts_yx = torch.as_tensor(shift_px, dtype=torch.float32).flip(-1)
        dft = fourier_shift_dft_2d(
            dft, image_shape=(big, big), shifts=shifts_yx, rfft=True, fftshifted=False
        )
    if ctf_params is not None:
        dft = dft * relion_ctf_2d(
            ctf_params["defocus_u_A"],
            ctf_params["defocus_v_A"],
            ctf_params["defocus_angle_deg"],
            ctf_params["voltage_kV"],
            ctf_params["cs_mm"],
            ctf_params["amplitude_contrast"],
            pixel_size_A,
            big,
        )
    x = torch.fft.irfftn(dft, dim=(-2, -1), s=(big, big))
    return x[..., pad : pad + box, pad : pad + box] if pad else x
