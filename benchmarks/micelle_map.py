"""Micelle map: how much of each projection is micelle, and how alike its views look.

Renders the built-in micelle map (``sim/micelle.py``: membrane protein + nanobody
in a detergent micelle) at the benchmark's box and pixel size and measures, on
clean projections (no CTF, no noise):

- the micelle's share of the projection power in resolution bands (micelle power
  over micelle + protein power, protein = membrane protein and nanobody), over
  100 near-uniform directions;
- how alike the 14 views of the benchmark set are (the views ``quality.py --map
  micelle`` simulates with seed 0): for every pair of views, the normalised
  correlation after the best in-plane rotation and shift (no mirror) under a soft
  mask of 1.1x the particle diameter, with the images low-passed at 30 Å, or
  band-passed from ``L`` to 8 Å for several ``L``; with and without the micelle,
  and for the built-in phantom's benchmark set for comparison;
- the Fourier ring correlation of different views after that alignment (40-8 Å,
  as the scorer aligns): whether two different views already match to 25 Å.

Usage::

    python benchmarks/micelle_map.py [--fraction 0.4] [--out DIR]

Prints tables; writes ``OUT/micelle_map.json`` (default ``bench_out/micelle_map``).
Takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import MAPS, REPO, write_json

BANDS_A = ((None, 30.0), (30.0, 15.0), (15.0, 8.0), (8.0, None))
#: alignment bands: the full band to 8 Å, and with a minimum alignment resolution
ALIGN_BANDS_A = ((None, 8.0), (40.0, 8.0), (30.0, 8.0), (25.0, 8.0), (20.0, 8.0))


def _band_label(lo, hi) -> str:
    if lo is None:
        return f"> {hi:g} Å"
    if hi is None:
        return f"< {lo:g} Å"
    return f"{lo:g}-{hi:g} Å"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.4, help="micelle_fraction (0.4)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench_out/micelle_map")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from torch_fourier_shell_correlation import fourier_ring_correlation

    from napari_class2d.sim.ctf import relion_ctf_2d
    from napari_class2d.sim.filters import bandpass, radial_frequency
    from napari_class2d.sim.maps import particle_diameter_px
    from napari_class2d.sim.micelle import mean_density, micelle_particle
    from napari_class2d.sim.phantom import default_phantom
    from napari_class2d.sim.project import FourierProjector
    from napari_class2d.sim.score import align_to_views, frc_resolution
    from napari_class2d.sim.threads import torch_threads
    from napari_class2d.sim.transforms import rotate_and_shift, soft_disk
    from napari_class2d.sim.views import choose_view_directions, fibonacci_directions

    torch_threads(1).__enter__()
    box, apix = MAPS["micelle"]["box"], MAPS["micelle"]["apix"]
    model = micelle_particle(args.fraction)
    parts = model.render_parts(box, apix)
    protein = parts["protein"] + parts["nanobody"]
    micelle = parts["micelle"]
    full = protein + micelle
    diameter_A = model.diameter_px(parts) * apix
    mass = 1000.0 * (model.protein_kDa + model.nanobody_kDa)
    result: dict = {
        "box": box,
        "pixel_size_A": apix,
        "micelle_fraction": args.fraction,
        "model": model.summary(),
        "particle_diameter_A": round(diameter_A, 1),
        "protein_only_diameter_A": round(particle_diameter_px(protein) * apix, 1),
        "detergent_over_protein_density": round(
            float(micelle.max()) / mean_density(protein, mass, apix), 3
        ),
        "micelle_mass_share": round(float(micelle.sum() / full.sum()), 3),
    }
    print(
        f"micelle map at box {box}, {apix} Å: particle {diameter_A:.1f} Å across "
        f"(protein alone {result['protein_only_diameter_A']} Å), micelle density / protein "
        f"density {result['detergent_over_protein_density']}, micelle "
        f"{result['micelle_mass_share']:.0%} of the projected density"
    )

    # -- power shares by band, over near-uniform directions -----------------------
    rot, tilt = fibonacci_directions(100, np.random.default_rng(1))
    P = FourierProjector(protein).project(rot, tilt, 0.0)
    M = FourierProjector(micelle).project(rot, tilt, 0.0)
    f = radial_frequency(box, apix)
    # rfft holds the columns 1..D/2-1 once for two coefficients
    weight = torch.full_like(f, 2.0)
    weight[:, 0] = 1.0
    weight[:, -1] = 1.0
    pow_p = (torch.fft.rfftn(P, dim=(-2, -1)).abs() ** 2).mean(0) * weight
    pow_m = (torch.fft.rfftn(M, dim=(-2, -1)).abs() ** 2).mean(0) * weight
    # the same seen through the benchmark's CTFs (defocus 1-2.5 µm, 300 kV, 10 % amplitude)
    defocus = np.linspace(10000.0, 25000.0, 16)
    ctf2 = (relion_ctf_2d(defocus, defocus, 0.0, 300.0, 2.7, 0.1, apix, box) ** 2).mean(0)

    def share(lo, hi, ctf=False):
        sel = f > 0
        if lo is not None:
            sel &= f >= 1.0 / lo
        if hi is not None:
            sel &= f < 1.0 / hi
        w = ctf2 if ctf else torch.ones_like(f)
        m, p = float((pow_m * w)[sel].sum()), float((pow_p * w)[sel].sum())
        return m / (m + p)

    print("\nmicelle share of the projection power, micelle / (micelle + protein), 100 directions")
    print(f"  {'band':>10s}  {'no CTF':>7s}  {'with CTF':>8s}")
    shares = {}
    for lo, hi in BANDS_A + ALIGN_BANDS_A:
        label = _band_label(lo, hi)
        shares[label] = {"no_ctf": round(share(lo, hi), 3), "ctf": round(share(lo, hi, True), 3)}
        print(f"  {label:>10s}  {shares[label]['no_ctf']:7.2f}  {shares[label]['ctf']:8.2f}")
    result["micelle_power_share"] = shares
    rings = []
    for k in range(1, 9):
        sel = torch.round(f * box * apix).long() == k
        m, p = float(pow_m[sel].sum()), float(pow_p[sel].sum())
        rings.append((round(box * apix / k, 1), round(m / (m + p), 3)))
    result["micelle_power_share_per_ring"] = rings
    print("  per ring: " + ", ".join(f"{r:g} Å {s:.2f}" for r, s in rings))

    # -- similarity of the benchmark set's 14 views ----------------------------------
    def posed_similarity(proj, vol_apix, mask, lo, hi, step_deg=4.0):
        """(V, V) correlation of view i with view j in its best pose, band-passed and masked.

        The pose comes from the scorer's search (``align_to_views``); the correlation is
        then computed on the posed image itself (the search's sub-pixel peak heights
        can overshoot where the best shift lies at the edge of its range).
        """
        n, d = proj.shape[0], proj.shape[-1]
        al = align_to_views(proj, proj, vol_apix, mask, (lo, hi), rotation_step_deg=step_deg)
        posed = rotate_and_shift(
            proj[None].expand(n, n, d, d).reshape(-1, d, d),
            al["psi_deg"].reshape(-1),
            al["shift_A"].reshape(-1, 2),
            vol_apix,
        ).reshape(n, n, d, d)
        low = lo if lo < d * vol_apix else None

        def prep(x):
            x = bandpass(x * mask, vol_apix, low, max(hi, 2.2 * vol_apix)) * mask
            x = x - x.mean(dim=(-2, -1), keepdim=True)
            return x / x.flatten(-2).norm(dim=-1)[..., None, None]

        return (prep(proj)[:, None] * prep(posed)).sum(dim=(-2, -1)), al

    def similarity(proj, vol_apix, mask, bands):
        n = proj.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        out = {}
        for lo, hi in bands:
            sim, _ = posed_similarity(proj, vol_apix, mask, lo, hi)
            vals = sim[off]
            out[_band_label(None if lo > 1e3 else lo, hi)] = {
                "mean": round(float(vals.mean()), 3),
                "max": round(float(vals.max()), 3),
            }
        return out

    def benchmark_views(vol, vol_apix, diameter):
        """The 14 views the simulator picks for this map with seed 0, and the scorer's mask."""
        rng = np.random.default_rng(0)  # the simulator's first draws with seed 0
        views = choose_view_directions(vol, 14, rng, vol_apix, diameter)
        mask = soft_disk(vol.shape[-1], 0.5 * 1.1 * diameter / vol_apix, edge_px=4.0)
        return views["rot_deg"], views["tilt_deg"], mask

    def print_table(title, columns):
        print(f"\n{title} (mean / max over pairs, each in its best rotation + shift)")
        print(f"  {'band':>10s}" + "".join(f"  {name:>13s}" for name in columns))
        for key in next(iter(columns.values())):
            row = [c[key] for c in columns.values()]
            print(f"  {key:>10s}" + "".join(f"  {r['mean']:.2f} / {r['max']:.2f}" for r in row))

    bands = [(1e9, 30.0), (40.0, 8.0), (30.0, 8.0), (25.0, 8.0), (20.0, 8.0), (15.0, 8.0)]
    rot14, tilt14, mask = benchmark_views(full, apix, diameter_A)
    proj_full = FourierProjector(full).project(rot14, tilt14, 0.0)
    proj_prot = FourierProjector(protein).project(rot14, tilt14, 0.0)
    ph_apix, ph_box = MAPS["phantom"]["apix"], MAPS["phantom"]["box"]
    ph_diam = 0.6 * ph_box * ph_apix
    ph = default_phantom().render(ph_box, ph_apix, 0.5 * ph_diam)
    ph = ph / ph.max()
    ph_rot, ph_tilt, ph_mask = benchmark_views(ph, ph_apix, ph_diam)
    proj_ph = FourierProjector(ph).project(ph_rot, ph_tilt, 0.0)
    views14 = {
        "particle": similarity(proj_full, apix, mask, bands),
        "protein only": similarity(proj_prot, apix, mask, bands),
        "phantom": similarity(proj_ph, ph_apix, ph_mask, bands),
    }
    print_table("similarity of the benchmark set's 14 views", views14)
    # side views turned about the membrane normal: the micelle looks the same in all
    side_rot, side_tilt = np.arange(0.0, 360.0, 45.0), np.full(8, 90.0)
    side = {
        "particle": similarity(
            FourierProjector(full).project(side_rot, side_tilt, 0.0), apix, mask, bands
        ),
        "protein only": similarity(
            FourierProjector(protein).project(side_rot, side_tilt, 0.0), apix, mask, bands
        ),
    }
    print_table("similarity of 8 side views, 45° apart about the membrane normal", side)
    result["view_similarity"] = {"benchmark_views": views14, "side_views": side}

    # -- do different views already match each other to 25 Å? ----------------------
    def cross_view_frc(proj, vol_apix, mask):
        """FRC 0.5 resolution of each view against each other view in its best pose, as
        the scorer compares a class average with a view (aligned 40-8 Å)."""
        n, d = proj.shape[0], proj.shape[-1]
        al = align_to_views(proj, proj, vol_apix, mask, (40.0, 8.0), rotation_step_deg=2.0)
        posed = rotate_and_shift(
            proj[None].expand(n, n, d, d).reshape(-1, d, d),
            al["psi_deg"].reshape(-1),
            al["shift_A"].reshape(-1, 2),
            vol_apix,
        ).reshape(n, n, d, d)
        frc = fourier_ring_correlation(proj[:, None] * mask, posed * mask)
        res = frc_resolution(frc, d, vol_apix)[~np.eye(n, dtype=bool)]
        return {
            "best_A": round(float(res.min()), 1),
            "median_A": round(float(np.median(res)), 1),
            "pairs_reaching_25A": int((res <= 25.0).sum()),
            "pairs": int(res.size),
        }

    cross = {
        "micelle": cross_view_frc(proj_full, apix, mask),
        "phantom": cross_view_frc(proj_ph, ph_apix, ph_mask),
    }
    result["cross_view_frc"] = cross
    print("\nFRC 0.5 of a view against another view (aligned 40-8 Å, as the scorer does)")
    for name, c in cross.items():
        print(
            f"  {name:8s}: best {c['best_A']} Å, median {c['median_A']} Å; "
            f"{c['pairs_reaching_25A']} of {c['pairs']} (view, other view) pairs reach 25 Å"
        )
    out = args.out or REPO / "bench_out" / "micelle_map"
    write_json(out / "micelle_map.json", result)
    print(f"wrote {out / 'micelle_map.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
