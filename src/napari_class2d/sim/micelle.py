"""A built-in membrane protein with a bound nanobody in a detergent micelle.

The seed problem of this project in miniature: a small (~37 kDa) seven-helix
membrane protein with a small cytoplasmic domain, a nanobody (~13 kDa) bound
off-axis on its extracellular face, and a detergent micelle around its
transmembrane part. The micelle is an oblate ellipsoid (95 x 95 x 40 Å) of
uniform low density (``micelle_fraction`` of the protein's mean density) with a
smooth edge. It is wider than the protein and featureless: it holds about half
of the projected density, adds to every view the same outline (a disc seen
along the membrane normal, a 40 Å band seen from the side) and so makes views
alike at low resolution, while the helices, the soluble domain and the
nanobody carry the finer features (measured in ``docs/simulation.md``).

Everything is hand-placed, one Gaussian bead per residue (110 Da; a helix
rises 1.5 Å per residue, a strand 3.3 Å), so the map is the same on every
machine, needs no file, has no symmetry and renders at any pixel size.
Coordinates are in Å: ``z`` is the membrane normal (``+z`` extracellular), the
origin the centre of the box. The density is in Da/Å³ before normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from napari_class2d.sim.maps import particle_diameter_px

#: one bead per residue: its mass (Da), and the rise per residue along a helix, a strand
#: and a loop (Å)
RESIDUE_DA = 110.0
RISE_HELIX_A, RISE_STRAND_A, RISE_LOOP_A = 1.5, 3.3, 2.5
#: a residue's bead: Gaussian width (Å) and, in a helix, its distance from the axis (Å);
#: a helix with its side chains is then a rod ~10 Å across
SIGMA_RESIDUE_A, HELIX_RADIUS_A = 2.0, 2.8
#: protein density, Da/Å³ (1.35 g/cm³): mass to molecular volume
PROTEIN_DA_PER_A3 = 0.81
#: the assembly's offset from the box centre (Å): centres the particle's extent in the box
ASSEMBLY_OFFSET_A = (0.0, 0.0, -5.0)


def _residues(centres: np.ndarray, sigma_A: float = SIGMA_RESIDUE_A):
    n = len(centres)
    return centres, np.full(n, sigma_A), np.full(n, RESIDUE_DA)


def _perpendicular(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(u, a)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(u, e1)


def _helix(p0, p1):
    """An alpha helix from ``p0`` to ``p1`` (Å): residues 1.5 Å apart, 100° around the axis."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.linalg.norm(p1 - p0))
    u = (p1 - p0) / length
    e1, e2 = _perpendicular(u)
    i = np.arange(int(round(length / RISE_HELIX_A)) + 1)[:, None]
    turn = np.deg2rad(100.0) * i
    centres = p0 + RISE_HELIX_A * i * u + HELIX_RADIUS_A * (np.cos(turn) * e1 + np.sin(turn) * e2)
    return _residues(centres)


def _strand(p0, p1, side):
    """A beta strand ``p0`` -> ``p1``: residues 3.3 Å apart, side chains alternating ``side``."""
    p0, p1, side = (np.asarray(v, float) for v in (p0, p1, side))
    length = float(np.linalg.norm(p1 - p0))
    n = int(round(length / RISE_STRAND_A)) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    flip = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    return _residues(p0 + t * (p1 - p0) + flip * side)


def _arc(p0, p1, bulge):
    """A loop ``p0`` -> ``p1`` bowing out by ``bulge`` (Å) at its middle, 2.5 Å per residue."""
    p0, p1, bulge = (np.asarray(v, float) for v in (p0, p1, bulge))
    mid = 0.5 * (p0 + p1) + bulge
    # quadratic Bezier through the bowed middle point
    ctrl = 2 * mid - 0.5 * (p0 + p1)
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p1
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    n = max(2, int(round(s[-1] / RISE_LOOP_A)) + 1)
    # the end residues belong to the elements the loop joins
    at = np.linspace(0.0, s[-1], n)[1:-1]
    centres = np.stack([np.interp(at, s, curve[:, k]) for k in range(3)], -1)
    return _residues(centres.reshape(-1, 3))


def _helix_axis(ring_deg, ring_A, tilt_deg, tilt_dir_deg, length_A, z_A):
    """End points (cytoplasmic, extracellular) of a transmembrane helix."""
    th, ph, tl = np.deg2rad(ring_deg), np.deg2rad(tilt_dir_deg), np.deg2rad(tilt_deg)
    centre = np.array([ring_A * math.cos(th), ring_A * math.sin(th), z_A])
    u = np.array([math.sin(tl) * math.cos(ph), math.sin(tl) * math.sin(ph), math.cos(tl)])
    return centre - 0.5 * length_A * u, centre + 0.5 * length_A * u


#: the seven transmembrane helices: ring angle (°), ring radius (Å), tilt (°), tilt
#: direction (°), length (Å), height of the centre (Å); irregular on purpose
TM_HELICES = (
    (0.0, 13.5, 25.0, 40.0, 42.0, 1.0),
    (54.0, 13.0, 12.0, 160.0, 38.0, -2.0),
    (100.0, 9.0, 30.0, 250.0, 46.0, 3.0),
    (160.0, 14.5, 8.0, 300.0, 30.0, 2.0),
    (205.0, 13.5, 20.0, 100.0, 44.0, -3.0),
    (258.0, 13.0, 15.0, 200.0, 42.0, 0.0),
    (305.0, 12.5, 18.0, 20.0, 36.0, 1.0),
)


def _bundle_core(ends, sigma_A: float = 4.5, linear_Da_per_A: float = 100.0):
    """The side chains that fill the middle of the helix bundle: beads along its centre line.

    Without them the bundle would be a hollow ring of rods and the detergent would fill it.
    """
    bottoms, tops = np.array([e[0] for e in ends]), np.array([e[1] for e in ends])
    zs = np.arange(bottoms[:, 2].max() + 3.0, tops[:, 2].min() - 3.0 + 1e-9, 3.0)
    t = (zs[:, None] - bottoms[None, :, 2]) / (tops[None, :, 2] - bottoms[None, :, 2])
    axis_points = bottoms[None] + t[..., None] * (tops - bottoms)[None]  # (z, helix, 3)
    centres = axis_points.mean(axis=1)
    n = len(centres)
    return centres, np.full(n, sigma_A), np.full(n, linear_Da_per_A * 3.0)


def _membrane_protein() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Seven TM helices, their loops, a long ECL2 lid, helix 8 and a small cytoplasmic domain."""
    parts = []
    ends = [_helix_axis(*h) for h in TM_HELICES]
    for bottom, top in ends:
        parts.append(_helix(bottom, top))
    parts.append(_bundle_core(ends))
    # helix k runs top -> bottom for even k (N-terminus extracellular), so loops
    # alternate: bottom k -> bottom k+1 (intracellular), then top -> top (extracellular)
    for k in range(6):
        a, b = ends[k], ends[k + 1]
        inside = k % 2 == 0
        p0, p1 = (a[0], b[0]) if inside else (a[1], b[1])
        mid_xy = 0.5 * (p0[:2] + p1[:2])
        out = mid_xy / max(np.linalg.norm(mid_xy), 1e-6)
        if k == 4:  # ICL3: replaced by the cytoplasmic domain below
            continue
        if k == 3:  # ECL2: a long loop folding over the top of the bundle (a lid)
            parts.append(_arc(p0, p1, np.array([-4.0, 3.0, 11.0]) - [*(0.3 * mid_xy), 0.0]))
            continue
        dz = -4.0 if inside else 4.0
        parts.append(_arc(p0, p1, np.array([3.0 * out[0], 3.0 * out[1], dz])))
    # N-terminal tail on the extracellular side
    parts.append(_arc(ends[0][1] + [0, 0, 6.0], ends[0][1], np.array([4.0, -3.0, 1.0])))
    # helix 8: amphipathic, lying flat on the cytoplasmic surface after TM7
    h8_start = ends[6][0] + np.array([2.0, -1.0, -3.0])
    h8_end = h8_start + np.array([15.0, -8.0, -2.0])
    parts.append(_arc(ends[6][0], h8_start, np.array([0.0, 0.0, -1.0])))
    parts.append(_helix(h8_start, h8_end))
    # cytoplasmic domain in place of ICL3 (between TM5 and TM6): four short helices
    c = np.array([-9.0, -10.0, -27.0])
    dom = [
        (c + [-8.0, 4.0, 3.0], c + [6.0, 7.0, 5.0]),
        (c + [7.0, 2.0, -1.0], c + [-6.0, -3.0, -3.0]),
        (c + [-7.0, -6.0, 4.0], c + [4.0, -9.0, 7.0]),
        (c + [2.0, 10.0, -4.0], c + [-5.0, 3.0, -8.0]),
    ]
    for a, b in dom:
        parts.append(_helix(a, b))
    parts.append(_arc(ends[4][0], dom[0][0], np.array([-2.0, 0.0, -2.0])))
    for (_, b), (a, _) in zip(dom[:-1], dom[1:], strict=True):
        parts.append(_arc(b, a, np.array([0.0, 0.0, 0.0])))
    parts.append(_arc(dom[-1][1], ends[5][0], np.array([0.0, 3.0, 0.0])))
    return parts


def _nanobody() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An Ig-like beta sandwich (5 + 5 strands, ~30 Å long) with CDR loops, placed off-axis."""
    strand_A, sheet_gap_A, pitch_A = 24.0, 10.0, 4.8
    strands = []
    for sheet, n in ((-0.5, 5), (0.5, 5)):
        for i in range(n):
            x, y = sheet * sheet_gap_A, (i - 0.5 * (n - 1)) * pitch_A
            # a little stagger, and neighbouring strands run antiparallel
            a = np.array([x, y, -0.5 * strand_A + 1.5 * (i % 2)])
            b = np.array([x, y, 0.5 * strand_A - 1.0 * (i % 3)])
            strands.append((a, b) if i % 2 == 0 else (b, a))
    parts = [_strand(a, b, [1.0, 0.0, 0.0]) for a, b in strands]
    # hairpins join each strand's end to the next strand's start, bowing outwards
    for (_, b), (a, _) in zip(strands[:-1], strands[1:], strict=True):
        parts.append(_arc(b, a, np.array([0.0, 0.0, 2.5 if b[2] > 0 else -2.5])))
    # CDR3: a long loop at the -z end, the end that binds the protein
    parts.append(_arc(strands[4][0], strands[5][1] - [0.0, 0.0, 7.0], np.array([3.0, 2.0, -4.0])))
    # orientation: long axis tilted 55° from the membrane normal, leaning over the bundle
    R = _rotation_z(135.0) @ _rotation_y(55.0) @ _rotation_z(25.0)
    # the CDR end sits on the extracellular face, off the bundle's axis
    contact = np.array([6.0, -5.0, 22.0])
    centre = contact + R @ np.array([0.0, 0.0, 0.5 * strand_A + 3.0])
    return [(centre + c @ R.T, s, m) for c, s, m in parts]


def _rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotation_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _beads(parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def render_beads(
    centres_A: np.ndarray,
    sigmas_A: np.ndarray,
    masses_Da: np.ndarray,
    box: int,
    pixel_size_A: float,
    blur_A: float = 0.0,
) -> np.ndarray:
    """Isotropic Gaussian beads sampled at the voxel centres: ``(D, D, D)`` ``[z, y, x]`` Da/Å³.

    Each bead is widened by ``blur_A`` and by half a pixel (so beads narrower
    than a pixel do not alias); its mass is kept. Voxel ``D//2`` is at 0 Å.
    """
    out = np.zeros((box, box, box))
    r = (np.arange(box) - box // 2) * pixel_size_A
    sig = np.sqrt(sigmas_A**2 + blur_A**2 + (0.5 * pixel_size_A) ** 2)
    amp = masses_Da / ((2 * math.pi) ** 1.5 * sig**3)
    for c, s, a in zip(centres_A, sig, amp, strict=True):
        reach = 4.5 * s
        lo = np.maximum(np.ceil((c - reach) / pixel_size_A).astype(int) + box // 2, 0)
        hi = np.minimum(np.floor((c + reach) / pixel_size_A).astype(int) + box // 2 + 1, box)
        if (hi <= lo).any():
            continue
        gx = np.exp(-0.5 * ((r[lo[0] : hi[0]] - c[0]) / s) ** 2)
        gy = np.exp(-0.5 * ((r[lo[1] : hi[1]] - c[1]) / s) ** 2)
        gz = np.exp(-0.5 * ((r[lo[2] : hi[2]] - c[2]) / s) ** 2)
        out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] += a * (
            gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
        )
    return out


def mean_density(volume, mass_Da: float, pixel_size_A: float) -> float:
    """Mean density over a molecule's volume, as a map is read at its molecular contour.

    The volume is the densest voxels that together hold ``mass_Da`` at the
    protein density :data:`PROTEIN_DA_PER_A3` (the contour that encloses the
    molecular volume); the answer is their mean, in the map's units.
    """
    v = np.sort(np.asarray(volume, dtype=np.float64).ravel())[::-1]
    n = max(1, min(len(v), int(round(mass_Da / PROTEIN_DA_PER_A3 / pixel_size_A**3))))
    return float(v[:n].mean())


@dataclass(frozen=True)
class MicelleParticle:
    """A membrane protein (Gaussian beads), its nanobody and a detergent micelle, in Å.

    Attributes
    ----------
    protein, nanobody
        ``(centres (n, 3) Å as (x, y, z), sigmas (n,) Å, masses (n,) Da)`` of the beads.
    micelle_fraction
        Density of the detergent, away from its edge and from the protein, as a
        fraction of the protein's mean density over its molecular volume
        (:func:`mean_density`; protein and nanobody together).
    micelle_centre_A
        Centre of the micelle ``(x, y, z)``, Å from the box centre.
    micelle_radius_A, micelle_half_thickness_A
        Semi-axes of the oblate ellipsoid (in the membrane plane, along its normal ``z``).
    micelle_edge_A
        Width of the raised-cosine edge of the micelle (at least two pixels when rendered).
    envelope_blur_A
        The detergent is displaced by the protein's envelope: the protein's density
        blurred by this Gaussian, over its mean density (:func:`mean_density`),
        clipped to [0, 1].
    """

    protein: tuple[np.ndarray, np.ndarray, np.ndarray]
    nanobody: tuple[np.ndarray, np.ndarray, np.ndarray]
    micelle_fraction: float = 0.4
    micelle_centre_A: tuple[float, float, float] = (0.0, 0.0, 0.0)
    micelle_radius_A: float = 47.5
    micelle_half_thickness_A: float = 20.0
    micelle_edge_A: float = 10.0
    envelope_blur_A: float = 4.0

    @property
    def protein_kDa(self) -> float:
        return float(self.protein[2].sum()) / 1000.0

    @property
    def nanobody_kDa(self) -> float:
        return float(self.nanobody[2].sum()) / 1000.0

    def summary(self) -> dict:
        """The model's sizes, for ``truth.json``."""
        return {
            "protein_kDa": round(self.protein_kDa, 1),
            "nanobody_kDa": round(self.nanobody_kDa, 1),
            "micelle_fraction": self.micelle_fraction,
            "micelle_diameter_A": 2 * self.micelle_radius_A,
            "micelle_thickness_A": 2 * self.micelle_half_thickness_A,
            "micelle_edge_A": self.micelle_edge_A,
            "micelle_centre_A": list(self.micelle_centre_A),
            "envelope_blur_A": self.envelope_blur_A,
        }

    def micelle_shape(self, box: int, pixel_size_A: float) -> np.ndarray:
        """The micelle's ellipsoid with its soft edge, 0..1, before the protein displaces it."""
        r = (np.arange(box) - box // 2) * pixel_size_A
        z, y, x = np.meshgrid(r, r, r, indexing="ij")
        x0, y0, z0 = self.micelle_centre_A
        x, y, z = x - x0, y - y0, z - z0
        a, c = self.micelle_radius_A, self.micelle_half_thickness_A
        rho2 = x * x + y * y
        q = np.sqrt(rho2 / a**2 + z * z / c**2)
        # distance to the surface, to first order: (q - 1) / |grad q|
        grad = np.sqrt(rho2 / a**4 + z * z / c**4) / np.maximum(q, 1e-9)
        d = np.where(q > 1e-9, (q - 1.0) / np.maximum(grad, 1e-12), -c)
        w = max(self.micelle_edge_A, 2.0 * pixel_size_A)
        t = np.clip(d / w, -0.5, 0.5)
        return 0.5 * (1.0 - np.sin(math.pi * t))

    def render_parts(self, box: int, pixel_size_A: float) -> dict[str, torch.Tensor]:
        """``protein``, ``nanobody`` and ``micelle`` densities (Da/Å³), ``(D, D, D)`` each.

        Their sum is the particle: where the protein is, it displaces the detergent
        (``micelle = fraction * rho_protein * shape * (1 - envelope)``), so the
        densities do not add up inside the protein.
        """
        protein = render_beads(*self.protein, box, pixel_size_A)
        nanobody = render_beads(*self.nanobody, box, pixel_size_A)
        mass = 1000.0 * (self.protein_kDa + self.nanobody_kDa)
        rho = mean_density(protein + nanobody, mass, pixel_size_A)
        pairs = zip(self.protein, self.nanobody, strict=True)
        both = tuple(np.concatenate([p, n]) for p, n in pairs)
        env = render_beads(*both, box, pixel_size_A, blur_A=self.envelope_blur_A)
        envelope = np.clip(env / mean_density(env, mass, pixel_size_A), 0.0, 1.0)
        micelle = self.micelle_fraction * rho * self.micelle_shape(box, pixel_size_A)
        micelle *= 1.0 - envelope
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        return {"protein": as_t(protein), "nanobody": as_t(nanobody), "micelle": as_t(micelle)}

    def diameter_px(self, parts: dict[str, torch.Tensor]) -> float:
        """The particle's diameter in voxels: its extent at a quarter of the detergent's density.

        ``parts`` from :meth:`render_parts`. The micelle is the widest and faintest
        part: 5 % of the map's maximum (set by the protein's densest beads) lies
        inside its soft edge and measures the protein. Without a micelle, 5 % of
        the maximum as for any map.
        """
        vol = sum(parts.values())
        detergent = float(parts["micelle"].max())
        level = 0.25 * detergent if detergent > 0 else 0.05 * float(vol.max())
        return particle_diameter_px(vol, threshold=level / float(vol.max()))

    def render(self, box: int, pixel_size_A: float) -> torch.Tensor:
        """The whole particle ``(D, D, D)`` ``[z, y, x]`` in Da/Å³, centre at voxel ``D//2``."""
        return sum(self.render_parts(box, pixel_size_A).values())


def micelle_particle(micelle_fraction: float = 0.4) -> MicelleParticle:
    """The built-in membrane protein + nanobody in a detergent micelle (fixed geometry)."""
    if not 0.0 <= micelle_fraction <= 1.0:
        raise ValueError(f"micelle_fraction={micelle_fraction!r}: must be in [0, 1]")
    offset = np.asarray(ASSEMBLY_OFFSET_A)
    protein = _beads(_membrane_protein())
    nanobody = _beads(_nanobody())
    return MicelleParticle(
        protein=(protein[0] + offset, protein[1], protein[2]),
        nanobody=(nanobody[0] + offset, nanobody[1], nanobody[2]),
        micelle_fraction=float(micelle_fraction),
        micelle_centre_A=tuple(float(v) for v in offset),
    )
