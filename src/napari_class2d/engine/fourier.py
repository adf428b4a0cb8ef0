"""Fourier-space bookkeeping at the working box: the half-plane frequency list,
rings, shifts, and rotation of real-space images.

Conventions (used everywhere in the engine)
------------------------------------------
* Images are ``(..., D, D)`` arrays indexed ``[row, col]``; ``x = col``, ``y = row``;
  the image centre (rotation origin) is pixel ``(D // 2, D // 2)``.
* The Fourier transform is ``rfft2(ifftshift(image), norm="ortho")`` so the phase
  origin is the image centre. Only the frequencies of :class:`FourierGrid` are
  kept: the open disc ``0 < |f| < D/2`` on the half-plane ``kx > 0 or
  (kx == 0 and ky > 0)``. Each kept coefficient stands for itself and its
  Hermitian mate, so sums over it are half of full-plane sums.
* Shifting an image by ``t = (tx, ty)`` pixels multiplies its transform by
  ``exp(-2πi (kx tx + ky ty) / D)``.
* Rotating an image by ``ψ`` (counter-clockwise in ``(x, y)`` with ``y`` along
  rows) gives ``A_ψ(x) = A(R_{-ψ} x)`` and ``Â_ψ(f) = Â(R_{-ψ} f)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class FourierGrid:
    """The kept frequencies of a ``D x D`` image.

    Attributes
    ----------
    box
        Working box D in pixels.
    kx, ky
        Integer frequencies (cycles per box) of each kept coefficient, float32 ``(F,)``.
    rows, cols
        Their position in the ``(D, D // 2 + 1)`` rfft array, int64 ``(F,)``.
    radius
        ``|f|`` in cycles per box, ``(F,)``.
    ring
        Integer ring ``round(|f|)``, ``(F,)``; rings run ``1 .. D // 2 - 1``.
    """

    box: int
    kx: torch.Tensor
    ky: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    radius: torch.Tensor
    ring: torch.Tensor

    @classmethod
    def create(cls, box: int, device: torch.device | str = "cpu") -> FourierGrid:
        ky = torch.fft.fftfreq(box, d=1.0 / box, device=device)[:, None].expand(box, box // 2 + 1)
        kx = torch.arange(box // 2 + 1, device=device, dtype=torch.float32)[None, :].expand(
            box, box // 2 + 1
        )
        r = torch.sqrt(kx**2 + ky**2)
        keep = (r > 0) & (r < box / 2) & ((kx > 0) | (ky > 0))
        rows, cols = torch.nonzero(keep, as_tuple=True)
        return cls(
            box=box,
            kx=kx[rows, cols].float().contiguous(),
            ky=ky[rows, cols].float().contiguous(),
            rows=rows,
            cols=cols,
            radius=r[rows, cols].float().contiguous(),
            ring=torch.round(r[rows, cols]).long().contiguous(),
        )

    @property
    def n(self) -> int:
        return int(self.kx.numel())

    @property
    def n_rings(self) -> int:
        return self.box // 2 + 1

    def quarter_turn(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Index and conjugation flags giving ``T(R_{-90°} f)`` from ``T`` on this grid.

        For a transform ``T`` over the kept frequencies, ``T[..., perm]`` conjugated
        where ``conj`` is the transform of the image turned by a further +90°.
        """
        gx, gy = self.ky, -self.kx  # R_{-90} f
        lookup = {
            (int(x), int(y)): i
            for i, (x, y) in enumerate(zip(self.kx.tolist(), self.ky.tolist(), strict=True))
        }
        perm, conj = [], []
        for x, y in zip(gx.tolist(), gy.tolist(), strict=True):  # once per grid, not per image
            if (int(x), int(y)) in lookup:
                perm.append(lookup[(int(x), int(y))])
                conj.append(False)
            else:
                perm.append(lookup[(-int(x), -int(y))])
                conj.append(True)
        dev = self.kx.device
        return torch.tensor(perm, device=dev), torch.tensor(conj, device=dev)

    def subset(self, mask: torch.Tensor) -> FourierGrid:
        """The coefficients selected by ``mask`` as a grid of their own (same box)."""
        return FourierGrid(
            self.box,
            self.kx[mask],
            self.ky[mask],
            self.rows[mask],
            self.cols[mask],
            self.radius[mask],
            self.ring[mask],
        )

    def band(self, min_radius: float, max_radius: float) -> torch.Tensor:
        """Boolean mask of the coefficients with ``min_radius <= |f| <= max_radius``."""
        return (self.radius >= min_radius) & (self.radius <= max_radius)

    def radius_for_resolution(self, resolution_A: float, pixel_size_A: float) -> float:
        """Radius in cycles per box of a resolution in Å at this box and pixel size (Å)."""
        return self.box * pixel_size_A / resolution_A

    # -- transforms -----------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Kept coefficients of real images ``(..., D, D)`` -> complex ``(..., F)``."""
        ft = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)), norm="ortho")
        return ft[..., self.rows, self.cols]

    def to_rfft(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Place kept coefficients ``(..., F)`` in a Hermitian-complete rfft array."""
        d = self.box
        out = torch.zeros(
            coeffs.shape[:-1] + (d, d // 2 + 1), dtype=coeffs.dtype, device=coeffs.device
        )
        out[..., self.rows, self.cols] = coeffs
        where, mates = self._column_zero
        out[..., mates, 0] = coeffs[..., where].conj()
        return out

    @cached_property
    def _column_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column kx = 0 holds both ky and -ky: the kept coefficients there and the rows of
        their mates. Index tensors made once (a boolean mask would make every call on a
        GPU wait for the count of its true elements)."""
        where = torch.nonzero(self.cols == 0).flatten()
        return where, (-self.rows[where]) % self.box

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Real images ``(..., D, D)`` from kept coefficients ``(..., F)``."""
        d = self.box
        img = torch.fft.irfft2(self.to_rfft(coeffs), s=(d, d), norm="ortho")
        return torch.fft.fftshift(img, dim=(-2, -1))

    def shift_phase(self, shifts: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
        """``exp(sign * 2πi f·t / D)`` for shifts ``(..., 2)`` (x, y) px -> ``(..., F)``."""
        arg = (shifts[..., 0:1] * self.kx + shifts[..., 1:2] * self.ky) * (
            sign * 2.0 * math.pi / self.box
        )
        return torch.polar(torch.ones_like(arg), arg)

    def ring_average(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of ``values (..., F)`` over each ring -> ``(..., n_rings)`` (0 for empty rings)."""
        out = torch.zeros(
            values.shape[:-1] + (self.n_rings,), dtype=values.dtype, device=values.device
        )
        out.index_add_(-1, self.ring, values)
        return out / self._ring_count.to(values.dtype)

    @cached_property
    def _ring_count(self) -> torch.Tensor:
        """Coefficients per ring (at least 1), made once (``bincount`` waits for the GPU)."""
        return torch.bincount(self.ring, minlength=self.n_rings).clamp(min=1)


def rotation_grid(angles_deg: torch.Tensor, box: int) -> torch.Tensor:
    """Sampling grid for ``grid_sample`` that rotates ``(D, D)`` images by each angle.

    Output pixel ``x`` takes the input at ``R_{-ψ} x`` (about the centre), i.e.
    the content turns counter-clockwise by ψ in ``(x=col, y=row)``.
    Returns ``(R, D, D, 2)`` in ``align_corners=True`` normalised coordinates.
    """
    dev = angles_deg.device
    c = torch.arange(box, device=dev, dtype=torch.float32) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    a = torch.deg2rad(angles_deg.float())[:, None, None]
    cos, sin = torch.cos(a), torch.sin(a)
    src_x = cos * x + sin * y
    src_y = -sin * x + cos * y
    scale = 2.0 / (box - 1)
    return torch.stack(((src_x + box // 2) * scale - 1, (src_y + box // 2) * scale - 1), -1)


def rotate_images(
    images: torch.Tensor, angles_deg: torch.Tensor, mode: str = "bicubic"
) -> torch.Tensor:
    """Rotate real images ``(R, D, D)`` each by its angle (counter-clockwise, degrees)."""
    grid = rotation_grid(angles_deg, images.shape[-1])
    out = F.grid_sample(images[:, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[:, 0]


def _oversampled_spectrum(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-plane transform of real images ``(N, D, D)`` zero-padded ``pad`` times
    (oversampled ``pad`` times), ready for :func:`_sample_spectrum`: real and imaginary
    planes ``(N, 2, pD, pD // 2 + 1)``, rows ``ky = -pD/2 .. pD/2 - 1``, columns
    ``kx = 0 .. pD/2``.

    Bilinear interpolation of a spectrum multiplies the image by the transform of its
    triangle kernel, ``sinc²(x / pD) sinc²(y / pD)``; the images are divided by it first
    (gridding correction, as RELION does), which removes a radial attenuation of ~15 %
    at the edge of a particle filling the box.
    """
    return _oversampled_from_origin(torch.fft.ifftshift(images, dim=(-2, -1)), pad)


def _oversampled_from_origin(images: torch.Tensor, pad: int) -> torch.Tensor:
    """As :func:`_oversampled_spectrum` for images whose centre is pixel ``(0, 0)``
    (the ``ifftshift`` layout, as ``irfft2`` returns them)."""
    n, d = images.shape[0], images.shape[-1]
    big = d * pad
    c = torch.fft.ifftshift(torch.arange(d, device=images.device, dtype=torch.float32) - d // 2)
    kernel = torch.sinc(c / big) ** 2
    img = images / (kernel[:, None] * kernel[None, :])
    # pixels at non-negative offsets from the centre stay put, negative ones wrap round
    h, r = d // 2, d - d // 2
    padded = torch.zeros((n, big, big), dtype=torch.float32, device=images.device)
    padded[:, :r, :r] = img[:, :r, :r]
    padded[:, :r, big - h :] = img[:, :r, r:]
    padded[:, big - h :, :r] = img[:, r:, :r]
    padded[:, big - h :, big - h :] = img[:, r:, r:]
    ft = torch.roll(torch.fft.rfft2(padded, norm="ortho") * pad, big // 2, dims=-2)
    return torch.stack((ft.real, ft.imag), 1)


def _sample_spectrum(
    planes: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, pad: int
) -> torch.Tensor:
    """Bilinear samples of half-plane spectra (:func:`_oversampled_spectrum`) at
    frequencies ``(gx, gy)`` (cycles per box of the unpadded image), ``(N, M)`` each ->
    complex ``(N, M)``. A frequency with ``gx < 0`` is read at ``(-gx, -gy)``, conjugated
    (the images are real)."""
    big, width = planes.shape[-2], planes.shape[-1]
    mirror = gx < 0
    gx = torch.where(mirror, -gx, gx)
    gy = torch.where(mirror, -gy, gy)
    col = gx * pad * (2.0 / (width - 1)) - 1
    row = (gy * pad + big // 2) * (2.0 / (big - 1)) - 1
    out = F.grid_sample(
        planes,
        torch.stack((col, row), -1)[:, None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )[:, :, 0]
    return torch.complex(out[:, 0], torch.where(mirror, -out[:, 1], out[:, 1]))


def rotated_coefficients(
    images: torch.Tensor, angles_deg: torch.Tensor, grid: FourierGrid, pad: int = 2
) -> torch.Tensor:
    """Kept Fourier coefficients of each image rotated by each angle.

    The transform is oversampled ``pad`` times (zero-padding in real space) and
    interpolated bilinearly, as RELION does, so rotation loses little at high
    frequency.

    Parameters
    ----------
    images
        ``(K, D, D)`` real images.
    angles_deg
        ``(R,)`` rotation angles in degrees.

    Returns
    -------
    torch.Tensor
        Complex ``(K, R, F)``.
    """
    angles_deg = angles_deg.float()
    n = angles_deg.numel()
    if n % 4 == 0 and torch.allclose(
        angles_deg[n // 4 : n // 2] - angles_deg[: n // 4],
        torch.full((n // 4,), 90.0, device=angles_deg.device),
    ):
        # a quarter turn permutes the kept frequencies: interpolate one quadrant only
        base = rotated_coefficients(images, angles_deg[: n // 4], grid, pad)
        perm, conj = grid.quarter_turn()
        parts = [base]
        for _ in range(3):
            nxt = parts[-1][..., perm]
            parts.append(torch.where(conj, nxt.conj(), nxt))
        return torch.cat(parts, 1)
    k = images.shape[0]
    a = torch.deg2rad(angles_deg)[:, None]
    cos, sin = torch.cos(a), torch.sin(a)
    gx = (cos * grid.kx + sin * grid.ky).reshape(1, -1).expand(k, -1)  # R_{-psi} f
    gy = (-sin * grid.kx + cos * grid.ky).reshape(1, -1).expand(k, -1)
    out = _sample_spectrum(_oversampled_spectrum(images, pad), gx, gy, pad)
    return out.reshape(k, n, grid.n)


def turned_back(
    values: torch.Tensor, angles_deg: torch.Tensor, grid: FourierGrid, pad: int = 2
) -> torch.Tensor:
    """Coefficients ``v(R_ψ g)``: each row of ``values`` ``(M, F)`` (seen at in-plane
    angle ψ, its own) turned back to the class frame.

    Interpolated in Fourier space like :func:`rotated_coefficients` (the transform
    oversampled ``pad`` times, bilinear), so an interpolation error stays near the
    frequency it belongs to. Rotating in real space instead spreads the errors of a
    strong low-resolution signal over all frequencies, the same way for every
    particle: on images whose spectrum falls steeply (denoised micrographs) that is a
    consistent high-resolution pattern which the half-set FRC takes for signal.
    """
    a = torch.deg2rad(angles_deg.float())[:, None]
    cos, sin = torch.cos(a), torch.sin(a)
    gx = cos * grid.kx - sin * grid.ky  # R_psi g
    gy = sin * grid.kx + cos * grid.ky
    d = grid.box
    at_origin = torch.fft.irfft2(grid.to_rfft(values), s=(d, d), norm="ortho")
    return _sample_spectrum(_oversampled_from_origin(at_origin, pad), gx, gy, pad)


def rotate_even_spectrum(
    values: torch.Tensor, angles_deg: torch.Tensor, grid: FourierGrid
) -> torch.Tensor:
    """Sample real, even Fourier-space functions at rotated frequencies.

    ``values``: ``(M, F)`` real on the kept frequencies (a function with
    ``v(-f) = v(f)``, such as ``CTF²`` weights); returns ``v(R_ψ g)`` at every kept
    ``g`` for each row's angle ψ (degrees), by bilinear interpolation on the full plane.
    """
    d, m = grid.box, values.shape[0]
    plane = torch.zeros((m, d, d), dtype=values.dtype, device=values.device)
    c = d // 2
    ky, kx = grid.ky.long() + c, grid.kx.long() + c
    plane[:, ky, kx] = values
    mky, mkx = (c - grid.ky.long()) % d, (c - grid.kx.long()) % d
    plane[:, mky, mkx] = values
    a = torch.deg2rad(angles_deg.float())[:, None]
    cos, sin = torch.cos(a), torch.sin(a)
    gx = cos * grid.kx - sin * grid.ky  # R_psi g
    gy = sin * grid.kx + cos * grid.ky
    scale = 2.0 / (d - 1)
    sample = torch.stack(((gx + c) * scale - 1, (gy + c) * scale - 1), -1)  # (M, F, 2)
    out = F.grid_sample(
        plane[:, None],
        sample[:, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out[:, 0, 0]


def soft_circle(
    box: int, inner_radius_px: float, outer_radius_px: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(D, D)`` mask: 1 inside ``inner``, raised-cosine edge to 0 at ``outer`` (pixels)."""
    c = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return soft_edge(r, inner_radius_px, outer_radius_px)


def soft_edge(r: torch.Tensor, inner_radius_px: float, outer_radius_px: float) -> torch.Tensor:
    """The soft circular mask at distances ``r`` (pixels, any shape) from its centre: 1
    inside ``inner``, raised-cosine edge to 0 at ``outer``."""
    if outer_radius_px <= inner_radius_px:
        return (r <= inner_radius_px).float()
    t = ((r - inner_radius_px) / (outer_radius_px - inner_radius_px)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def fourier_pad(images: torch.Tensor, box: int) -> torch.Tensor:
    """``(..., d, d)`` images resampled to ``(..., box, box)`` by zero-padding their transform.

    The inverse of the Fourier crop to the working box: the image keeps its field of
    view (``box`` smaller pixels), holds no frequency at or beyond the ``d``-box Nyquist
    (the engine's kept frequencies, ``|f| < d/2``) and keeps its intensity scale (a
    constant image stays the same constant). ``box >= d``, both even or odd alike.
    ``torch_fourier_rescale.fourier_rescale_2d`` (used by the simulator) keeps the
    square's corners beyond ``d/2`` instead, which the engine never estimated.
    """
    d = images.shape[-1]
    if box == d:
        return images.clone()
    if box < d:
        raise ValueError(f"fourier_pad: box {box} is smaller than the images' {d}")
    dims = (-2, -1)
    spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=dims)), dim=dims)
    c = torch.arange(d, device=images.device, dtype=torch.float32) - d // 2
    keep = (c[:, None] ** 2 + c[None, :] ** 2) < (d / 2) ** 2
    out = torch.zeros((*images.shape[:-2], box, box), dtype=spec.dtype, device=images.device)
    o = box // 2 - d // 2
    out[..., o : o + d, o : o + d] = spec * keep
    padded = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(out, dim=dims)), dim=dims)
    return padded.real * (box / d) ** 2
