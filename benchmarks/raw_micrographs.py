"""Raw micrographs: pick, extract and classify the two raw micrographs in mrcfile's test data.

The mrcfile 1.5.4 source distribution ships two real, raw (not denoised) single-frame
micrographs with FEI extended headers: ``epu2.9_example.mrc`` (4096², 0.667 Å/px, Titan
Krios, Falcon, 300 kV, nominal defocus -2.2 µm) and ``fei-extended.mrc`` (3838 x 3710,
0.854 Å/px, Titan, EF-CCD, 300 kV, nominal defocus -0.8 µm). What is on them (by eye
and by the radial profile of the picks' plain average): ``epu2.9_example.mrc`` is crowded
with globular particles about 90 Å across; ``fei-extended.mrc`` holds fewer, irregular
particles about 130 Å across on a strong illumination gradient. Neither source names the
specimen; their sizes differ, so they are two different proteins, and a classification of
both together should keep them apart (the micrograph is a label we know).

Steps:

1. Fourier-crop both micrographs to a common 2.6 Å pixel (box 100 = 260 Å, twice the larger
   particle), invert (particles dark -> white).
2. Pick with a difference-of-Gaussians blob detector at each micrograph's particle size
   (``--diameters``, Å): sigma = radius / sqrt(2) against 1.6x that, peaks at least one
   diameter apart, at least ``--threshold`` robust standard deviations (median absolute
   deviation x 1.4826) above the median, and half a box from the edge.
3. Extract 100-px boxes, normalised as RELION does (zero mean and unit standard deviation
   outside a circle of 75 % of the box), into a RELION 3.1 particle set
   ``OUT/particles/particles.star`` (one optics group: 300 kV, Cs 2.7 mm, amplitude contrast
   0.1; no defocus, so the job runs with CTF off).
4. Classify with the defaults: K = ``--classes`` (10), particle diameter 140 Å, CTF off.
5. Report per class: particles, from which micrograph, the noise-texture check
   (:mod:`napari_class2d.texture`), and how round it is (normalised cross-correlation with
   its own rotational average after the best shift, band 100-10 Å: 1 for a featureless
   round blob, lower for a class with shape); and the normalised mutual information between
   classes and micrographs. Writes ``OUT/raw_micrographs.json``, ``OUT/raw_picks.png`` (the
   micrographs with the picks) and ``OUT/raw_classes.png`` (the class averages, largest first).

Usage::

    pip download --no-binary :all: --no-deps mrcfile==1.5.4 -d SDIST
    python benchmarks/raw_micrographs.py --sdist SDIST [--out DIR] [--classes 10]
        [--threshold 2.0] [--set KEY=VALUE ...] [--threads T]

``--sdist`` is the folder with ``mrcfile-1.5.4.tar.gz`` (read without unpacking) or its
unpacked tree.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, add_set_argument, machine, parse_overrides, peak_rss_mb, write_json
from _realdata import (
    class_gallery,
    classify,
    finite,
    normalised_mutual_information,
    read_result,
    save_figure,
)

from napari_class2d.io.readers import read_particles

MICROGRAPHS = ("epu2.9_example.mrc", "fei-extended.mrc")
#: particle diameters (Å) read off the micrographs (radial profile of the picks' average)
DIAMETERS_A = {"epu2.9_example.mrc": 90.0, "fei-extended.mrc": 130.0}
APIX, BOX = 2.6, 100
JOB_DIAMETER_A = 140.0


def load_micrographs(sdist: Path) -> dict[str, dict]:
    """The two micrographs as float32 arrays with their header pixel size (Å) and metadata."""
    from mrcfile.mrcinterpreter import MrcInterpreter

    found: dict[str, bytes] = {}
    for tar_path in sorted(sdist.glob("mrcfile-*.tar.gz")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in MICROGRAPHS and "test_data" in member.name:
                    found[name] = tar.extractfile(member).read()
    for name in MICROGRAPHS:
        if name not in found:
            hits = sorted(sdist.rglob(name))
            if hits:
                found[name] = hits[0].read_bytes()
    missing = [n for n in MICROGRAPHS if n not in found]
    if missing:
        sys.exit(
            f"{', '.join(missing)} not found under {sdist}; get them with\n"
            f"  pip download --no-binary :all: --no-deps mrcfile==1.5.4 -d {sdist}"
        )
    out = {}
    for name, raw in found.items():
        with MrcInterpreter(io.BytesIO(raw), permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).reshape(mrc.data.shape[-2:]).copy()
            apix = float(mrc.voxel_size.x)
            meta = {}
            ext = mrc.indexed_extended_header
            if ext is not None and len(ext):
                for key, unit, scale in (
                    ("HT", "kV", 1e-3),
                    ("Defocus", "µm", 1e6),
                    ("Applied defocus", "µm", 1e6),
                    ("Magnification", "x", 1.0),
                ):
                    if key in ext.dtype.names:
                        meta[f"{key} ({unit})"] = round(float(ext[0][key]) * scale, 3)
                for key in ("Microscope type", "Camera name"):
                    if key in ext.dtype.names:
                        meta[key] = ext[0][key].decode(errors="replace").strip("\x00 ")
        out[name] = {"image": data, "pixel_size_A": apix, "header": meta}
    return out


def gaussian_filter(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian low-pass by FFT (periodic boundary), sigma in pixels."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    g = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * g, s=image.shape)


def pick(image: np.ndarray, diameter_px: float, threshold: float, edge_px: int):
    """Difference-of-Gaussians blob picks: ``(y, x)`` pixel rows and columns and their z-scores."""
    import torch
    import torch.nn.functional as F

    sigma = 0.5 * diameter_px / math.sqrt(2.0)
    dog = gaussian_filter(image, sigma) - gaussian_filter(image, 1.6 * sigma)
    med = np.median(dog)
    z = ((dog - med) / (1.4826 * np.median(np.abs(dog - med)))).astype(np.float32)
    window = int(round(diameter_px)) | 1
    zt = torch.from_numpy(z)[None, None]
    peak = (zt == F.max_pool2d(zt, window, 1, window // 2))[0, 0].numpy() & (z > threshold)
    peak[:edge_px], peak[-edge_px:], peak[:, :edge_px], peak[:, -edge_px:] = 0, 0, 0, 0
    ys, xs = np.nonzero(peak)
    return ys, xs, z[ys, xs]


def extract(image: np.ndarray, ys, xs) -> np.ndarray:
    """``BOX``-pixel boxes around the picks, normalised outside 75 % of the box (RELION)."""
    c = np.arange(BOX) - (BOX - 1) / 2
    outside = np.hypot(*np.meshgrid(c, c, indexing="ij")) > 0.375 * BOX
    out = []
    for y, x in zip(ys, xs, strict=True):
        p = image[y - BOX // 2 : y + BOX // 2, x - BOX // 2 : x + BOX // 2]
        bg = p[outside]
        out.append((p - bg.mean()) / (bg.std() + 1e-6))
    return np.asarray(out, dtype=np.float32)


def make_particle_set(mics: dict, out: Path, threshold: float) -> dict:
    """Pick and extract both micrographs at ``APIX``; write ``out/particles.star``."""
    import mrcfile
    import pandas as pd
    import starfile
    import torch
    from torch_fourier_rescale import fourier_rescale_2d

    (out / "Particles").mkdir(parents=True, exist_ok=True)
    rows, picks = [], {}
    for name, mic in mics.items():
        small, spacing = fourier_rescale_2d(
            torch.from_numpy(mic["image"]),
            source_spacing=mic["pixel_size_A"],
            target_spacing=APIX,
        )
        image = -(small.numpy() - float(small.mean()))  # particles white
        d_px = DIAMETERS_A[name] / APIX
        ys, xs, z = pick(image, d_px, threshold, BOX // 2 + 1)
        boxes = extract(image, ys, xs)
        stem = Path(name).stem
        with mrcfile.new(out / "Particles" / f"{stem}.mrcs", overwrite=True) as m:
            m.set_data(boxes)
            m.set_image_stack()
            m.voxel_size = APIX
        for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
            rows.append(
                {
                    "rlnImageName": f"{i + 1:06d}@Particles/{stem}.mrcs",
                    "rlnMicrographName": name,
                    # micrograph pixels of the original image
                    "rlnCoordinateX": round(x * APIX / mic["pixel_size_A"], 1),
                    "rlnCoordinateY": round(y * APIX / mic["pixel_size_A"], 1),
                    "rlnOpticsGroup": 1,
                    "rlnAutopickFigureOfMerit": round(float(z[i]), 3),
                }
            )
        picks[name] = {
            "n": len(ys),
            "y": ys,
            "x": xs,
            "image": image,
            "spacing_A": [round(float(s), 4) for s in spacing],
        }
        print(f"{name}: {len(ys)} picks (diameter {DIAMETERS_A[name]:.0f} Å)", flush=True)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [APIX],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [APIX],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    star = out / "particles.star"
    starfile.write({"optics": optics, "particles": pd.DataFrame(rows)}, star, overwrite=True)
    return {"star": star, "picks": picks}


def picks_figure(picks: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(picks), figsize=(5.0 * len(picks), 5.4), squeeze=False)
    for ax, (name, p) in zip(axes[0], picks.items(), strict=True):
        # shown binned 2x (5.2 Å/px) and smoothed: the picture, not the data
        img = gaussian_filter(p["image"], 1.5)
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
        shown = img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        lo, hi = np.percentile(shown, [1, 99.5])
        ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi)
        r = 0.25 * DIAMETERS_A[name] / APIX
        for y, x in zip(p["y"], p["x"], strict=True):
            ax.add_patch(plt.Circle((x / 2, y / 2), r, fill=False, color="tab:red", lw=0.6))
        ax.set_title(
            f"{name}: {p['n']} picks, {DIAMETERS_A[name]:.0f} Å circles (inverted)",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = save_figure(fig, png, dpi=60)
    plt.close(fig)
    return out


def rotational_average(images: np.ndarray) -> np.ndarray:
    """Each image averaged over all in-plane angles about the box centre (1-pixel rings)."""
    box = images.shape[-1]
    c = np.arange(box) - box // 2
    ring = np.rint(np.hypot(*np.meshgrid(c, c, indexing="ij"))).astype(int).ravel()
    n = np.bincount(ring)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = (np.bincount(ring, img.ravel()) / n)[ring].reshape(box, box)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, required=True, help="folder with the mrcfile sdist")
    ap.add_argument("--out", type=Path, default=None, help="default: bench_out/raw_micrographs")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=2.0, help="pick threshold (robust z)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--png", type=Path, default=None, help="class picture")
    ap.add_argument("--picks-png", type=Path, default=None)
    add_set_argument(ap)
    args = ap.parse_args(argv)

    import torch

    from napari_class2d.compare import match_images
    from napari_class2d.texture import texture_measures

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or REPO / "bench_out" / "raw_micrographs"
    mics = load_micrographs(args.sdist)
    made = make_particle_set(mics, out / "particles", args.threshold)
    picks_png = picks_figure(made["picks"], args.picks_png or out / "raw_picks.png")

    particles = read_particles(made["star"])
    settings = {
        "n_classes": args.classes,
        "particle_diameter_A": JOB_DIAMETER_A,
        "ctf_correction": "off",
        "seed": args.seed,
    }
    settings.update(parse_overrides(args.set))
    print(f"classifying {len(particles)} particles: {settings}", flush=True)
    run = classify(particles, settings, out / "class2d")

    res = read_result(out / "class2d")
    avg, apix = res["averages"], res["pixel_size_A"]
    K = len(avg)
    table = res["particles"]
    cls = table["rlnClassNumber"].to_numpy(int)
    mic = table["rlnMicrographName"].astype(str).to_numpy()
    counts = np.bincount(cls, minlength=K + 1)[1:]
    tex = texture_measures(avg, apix, JOB_DIAMETER_A)
    oef, fpf = tex["outer_energy_fraction"], tex["fine_power_fraction"]
    t0 = time.perf_counter()
    live = np.nonzero(counts > 0)[0]
    x = torch.from_numpy(avg[live])
    m = match_images(
        x,
        torch.from_numpy(rotational_average(avg[live])),
        apix,
        mask_diameter_A=JOB_DIAMETER_A,
        band_A=(100.0, 10.0),
        max_shift_A=10.0,
    )
    roundness = m.score.diagonal().numpy()
    per_class = []
    for k in range(K):
        entry = {
            "class": k + 1,
            "n_particles": int(counts[k]),
            "resolution_A": finite(res["resolution_A"][k]),
            "outer_energy_fraction": None if np.isnan(oef[k]) else round(float(oef[k]), 3),
            "fine_power_fraction": None if np.isnan(fpf[k]) else round(float(fpf[k]), 3),
            "noise_texture": bool(tex["noise_texture"][k]),
        }
        for name in MICROGRAPHS:
            entry[f"from {name}"] = int(((cls == k + 1) & (mic == name)).sum())
        if k in live:
            entry["roundness"] = round(float(roundness[int(np.searchsorted(live, k))]), 3)
        per_class.append(entry)
    populated = [e for e in per_class if e["n_particles"] > 0]
    purity = sum(max(e[f"from {n}"] for n in MICROGRAPHS) for e in populated) / len(cls)
    summary = {
        "n_particles": int(len(cls)),
        "picks": {n: made["picks"][n]["n"] for n in MICROGRAPHS},
        "n_classes": K,
        "classes_populated": len(populated),
        "classes_with_10_or_more": sum(e["n_particles"] >= 10 for e in populated),
        "noise_textures_among_populated": sum(e["noise_texture"] for e in populated),
        "median_roundness": round(float(np.median(roundness)), 3),
        "micrograph_purity": round(float(purity), 3),
        "nmi_class_vs_micrograph": round(normalised_mutual_information(cls, mic), 3),
        "classification_wall_s": run["wall_s"],
        "classification_cpu_s": run["cpu_s"],
        "measure_s": round(time.perf_counter() - t0, 1),
    }
    record = {
        "benchmark": "raw_micrographs",
        "micrographs": {
            n: {
                "pixel_size_A": mics[n]["pixel_size_A"],
                "shape": list(mics[n]["image"].shape),
                "header": mics[n]["header"],
                "particle_diameter_A": DIAMETERS_A[n],
                "rescaled_spacing_A": made["picks"][n]["spacing_A"],
            }
            for n in MICROGRAPHS
        },
        "picking": {"threshold": args.threshold, "pixel_size_A": APIX, "box": BOX},
        "classification": {
            **run,
            "settings": settings,
            "peak_rss_MB": round(peak_rss_mb()),
        },
        "summary": summary,
        "per_class": per_class,
        "machine": machine(),
    }
    write_json(out / "raw_micrographs.json", record)
    print(json.dumps(summary, indent=2))
    short = {MICROGRAPHS[0]: "epu", MICROGRAPHS[1]: "fei"}
    for e in sorted(populated, key=lambda e: -e["n_particles"]):
        src = ", ".join(f"{short[n]} {e[f'from {n}']}" for n in MICROGRAPHS)
        print(
            f"  class {e['class']:2d}  n={e['n_particles']:4d} ({src})  "
            f"oef {e['outer_energy_fraction']:.2f} fine {e['fine_power_fraction']:.2f}"
            f"{' TEXTURE' if e['noise_texture'] else ''}  "
            f"roundness {e.get('roundness', float('nan')):.2f}"
        )
    titles, colors = [], []
    for e in per_class:
        src = "/".join(str(e[f"from {n}"]) for n in MICROGRAPHS)
        flag = "TEXTURE" if e["noise_texture"] else f"round {e.get('roundness', 0):.2f}"
        titles.append(f"#{e['class']} n={e['n_particles']}\nepu/fei {src}\n{flag}")
        colors.append("red" if e["noise_texture"] else "black")
    png = class_gallery(
        avg,
        counts,
        titles,
        colors,
        args.png or out / "raw_classes.png",
        f"mrcfile's raw micrographs: {summary['n_particles']} picks, K = {K}, CTF off; "
        f"{summary['classes_populated']} classes populated, "
        f"{summary['noise_textures_among_populated']} noise textures",
        ncol=5,
    )
    print(f"wrote {out / 'raw_micrographs.json'}, {picks_png} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
