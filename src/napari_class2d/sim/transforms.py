"""Pose conventions of the simulator: RELION Euler angles, in-plane rotation and shift.

Image arrays are ``(..., y, x)``: ``x`` is the column index, ``y`` the row
index, and the centre of a box of ``D`` pixels is pixel ``(D//2, D//2)``
(RELION and the teamtomo libraries agree on this). Coordinates below are in
pixels relative to that centre. In napari (row 0 at the top) ``+x`` points
right and ``+y`` points down.

The one formula everything else follows (see :func:`rotate_and_shift`)::

    particle(x) = view(R(psi) @ (x - t)),    R(psi) = [[cos psi, -sin psi],
                                                       [sin psi,  cos psi]]

i.e. the particle is its view's projection rotated by ``-psi`` about the box
centre (counter-clockwise by ``psi`` as displayed in napari, where ``+y`` points
down) and then moved by ``t``. In RELION terms ``rlnAnglePsi = psi`` and
``rlnOriginXAngst, rlnOriginYAngst = -t_x * a, -t_y * a`` (``a`` the pixel size):
the origin offset is the translation that brings the particle back to the box
centre.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch_fourier_rescale import fourier_rescale_2d
from torch_fourier_shift import fourier_shift_dft_2d


# -- Euler angles (RELION / XMIPP ZYZ convention) ------------------------------------
def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION's rotation matrix ``A`` for Euler angles (degrees), shape ``(..., 3, 3)``.

    ``A`` maps map (xyz) coordinates to image coordinates: the projection of a
    map ``V`` for angles ``(rot, tilt, psi)`` is
    ``P(x, y) = integral of V(A.T @ (x, y, z)) dz``, as in RELION's projector.
    The viewing direction in the map frame is ``A.T @ (0, 0, 1)``
    ``= (sin tilt cos rot, sin tilt sin rot, cos tilt)``.
    """
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(a.shape + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_matrix`: ``(rot, tilt, psi)`` in degrees, tilt in [0, 180]."""
    A = np.asarray(A, dtype=np.float64)
    tilt = np.arccos(np.clip(A[..., 2, 2], -1.0, 1.0))
    sb = np.sin(tilt)
    regular = sb > 1e-6
    rot = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    psi = np.where(
        regular,
        np.arctan2(A[..., 1, 2], -A[..., 0, 2]),
        # tilt 0 (or 180): only rot + psi (or psi - rot) is defined; put it all in psi
        np.arctan2(-A[..., 1, 0], A[..., 0, 0]) * 1.0,
    )
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def inplane_matrix(psi_deg) -> np.ndarray:
    """RELION's matrix for a pure in-plane rotation, ``euler_to_matrix(0, 0, psi)``."""
    return euler_to_matrix(0.0, 0.0, psi_deg)


# -- 2D rotation and shift ------------------------------------------------------------
def _check_even_box(box: int) -> None:
    if box % 2:
        raise ValueError(f"box must be even (got {box} px): the box centre is pixel box//2")


def fourier_upsample(images: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Band-limited (sinc) upsampling by Fourier padding, ``(..., D, D) -> (..., fD, fD)``.

    The box centre ``D//2`` maps to ``fD//2``, so relative coordinates scale by ``factor``.
    """
    box = images.shape[-1]
    _check_even_box(box)
    if factor == 1:
        return images
    out, _ = fourier_rescale_2d(images, target_shape=(factor * box, factor * box))
    return out


def rotate_upsampled(
    upsampled: torch.Tensor,
    psi_deg: torch.Tensor,
    box: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate images given at ``f``-times oversampling and sample them back at ``box``.

    Computes ``out(x) = img(R(psi) @ x)`` (pixels, relative to the box centre) by
    bicubic interpolation of the oversampled image, which is accurate to well
    below 1 % for band-limited images at 2x oversampling.

    Parameters
    ----------
    upsampled
        ``(M, fD, fD)`` images from :func:`fourier_upsample`.
    psi_deg
        ``(N,)`` rotation angles in degrees.
    box
        Output box ``D``.
    index
        ``(N,)`` which of the ``M`` images each output uses (default: ``arange(N)``).

    Returns
    -------
    torch.Tensor
        ``(N, D, D)`` float32 rotated images.
    """
    _check_even_box(box)
    big = upsampled.shape[-1]
    factor = big // box
    if index is not None:
        upsampled = upsampled[index]
    n = upsampled.shape[0]
    psi = torch.deg2rad(torch.as_tensor(psi_deg, dtype=torch.float32)).reshape(n)
    c, s = torch.cos(psi), torch.sin(psi)
    r = torch.arange(box, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(r, r, indexing="ij")  # (D, D)
    # source position u = R(psi) x, in oversampled pixels around the oversampled centre
    ux = (c[:, None, None] * x - s[:, None, None] * y) * factor + big // 2
    uy = (s[:, None, None] * x + c[:, None, None] * y) * factor + big // 2
    # align_corners=True: pixel j <-> normalised 2 j / (W - 1) - 1
    grid = torch.stack((ux, uy), dim=-1) * (2.0 / (big - 1)) - 1.0
    out = F.grid_sample(
        upsampled[:, None].float(), grid, mode="bicubic", padding_mode="zeros", align_corners=True
    )
    return out[:, 0]


def shift_padded(
    images: torch.Tensor, shift_px: torch.Tensor, pad_factor: int = 2
) -> torch.Tensor:
    """Move image content by ``shift_px`` = ``(N, 2)`` (x, y) pixels, without wrap-around.

    Content moves towards ``+x`` (right) and ``+y`` (down in napari). The image
    is zero-padded by ``pad_factor`` before the Fourier phase shift and cropped
    after it, so what leaves the box is lost and nothing wraps in.
    """
    box = images.shape[-1]
    pad = (pad_factor * box - box) // 2
    x = F.pad(images, [pad] * 4) if pad else images
    big = x.shape[-1]
    dft = torch.fft.rfftn(x, dim=(-2, -1))
    shifts_yx = torch.as_tensor(shift_px, dtype=torch.float32).flip(-1)
    dft = fourier_shift_dft_2d(
        dft, image_shape=(big, big), shifts=shifts_yx, rfft=True, fftshifted=False
    )
    x = torch.fft.irfftn(dft, dim=(-2, -1), s=(big, big))
    return x[..., pad : pad + box, pad : pad + box] if pad else x


def rotate_and_shift(
    images: torch.Tensor | np.ndarray,
    psi_deg: torch.Tensor | np.ndarray | float,
    shift_A: torch.Tensor | np.ndarray,
    pixel_size_A: float,
) -> torch.Tensor:
    """Put centred, unrotated images into a particle pose: rotate by ``psi``, then shift.

    With ``x = (column - D//2, row - D//2)`` in pixels and ``t = shift_A / pixel_size_A``::

        out(x) = image(R(psi) @ (x - t)),   R(psi) = [[cos psi, -sin psi],
                                                      [sin psi,  cos psi]]

    so the content is rotated by ``-psi`` about the box centre (counter-clockwise
    by ``psi`` on screen in napari, whose ``+y`` axis points down) and then moved
    by ``+t`` (``+x`` right, ``+y`` down in napari). This is RELION's model of a
    particle with ``rlnAnglePsi = psi`` and
    ``rlnOriginXAngst = -shift_A[..., 0]``, ``rlnOriginYAngst = -shift_A[..., 1]``;
    to undo it (align the particle to the view), shift by ``-t`` then rotate by ``+psi``.

    The rotation is bicubic interpolation of the 2x Fourier-oversampled image,
    the shift a Fourier phase shift on a 2x zero-padded box (nothing wraps round).

    Parameters
    ----------
    images
        ``(N, D, D)`` (or ``(D, D)``) images, ``D`` even.
    psi_deg
        ``(N,)`` or scalar in-plane angles, degrees.
    shift_A
        ``(N, 2)`` or ``(2,)`` shifts ``(x, y)`` in Å.
    pixel_size_A
        Pixel size in Å.

    Returns
    -------
    torch.Tensor
        ``(N, D, D)`` (or ``(D, D)``) float32 images.
    """
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    images = images.float()
    single = images.ndim == 2
    if single:
        images = images[None]
    n, box = images.shape[0], images.shape[-1]
    psi = torch.as_tensor(psi_deg, dtype=torch.float32).reshape(-1).expand(n)
    shift = torch.as_tensor(shift_A, dtype=torch.float32).reshape(-1, 2).expand(n, 2)
    rotated = rotate_upsampled(fourier_upsample(images, 2), psi, box)
    out = shift_padded(rotated, shift / float(pixel_size_A))
    return out[0] if single else out


def soft_disk(box: int, radius_px: float, edge_px: float = 3.0) -> torch.Tensor:
    """``(D, D)`` disk: 1 inside ``radius_px``, raised-cosine fall-off over ``edge_px``."""
    r = torch.arange(box, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    d = torch.sqrt(x**2 + y**2)
    t = ((d - radius_px) / max(edge_px, 1e-6)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))
