"""Real particles: the default job on RELION's β-galactosidase tutorial particles (EMPIAR-10017).

1. Extracts the tutorial's 5,933 autopicked particles from the 10 denoised micrographs in
   ``../shared/data/real_micrographs/betagal_empiar10017_cryosegnet`` with
   ``../shared/tools/extract_particles.py`` (box 200 at 1.77 Å, binned 2: box 100 at 3.54 Å,
   inverted), into ``OUT/particles`` (``--reuse`` keeps an extraction already there).
2. Classifies them through the engine API with the project's defaults: K = 50, particle
   diameter 200 Å, CTF off (the micrographs are denoised JPEGs; the file has no defocus),
   seed 0; the maximum resolution follows the data (Nyquist 7.08 Å) and the CTF-less file
   is classified without CTF correction, as a user's job would be.
3. Judges each class average (``OUT/real_betagal.json``, printed):
   - populated: with at least 1 and at least 20 particles;
   - its best match (normalised cross-correlation after the best in-plane rotation and
     shift, :func:`napari_class2d.compare.match_images`, masked to 200 Å) with each of the
     32 tutorial averages (``relion_tutorial_class_averages.mrcs``: the tutorial's particles
     averaged with its own poses; band 100-15 Å) and with projections of the β-gal map
     (``../shared/data/maps/relion_betagal_ref_model_100px_3.54A.mrc``, ~40 Å low-pass, over
     ``--directions`` directions of the sphere; band 100-30 Å); and as the baseline, the same
     score for a round blob (the best of a soft disc and a Gaussian of β-gal's projected size
     and the rotational average of all particles' plain mean, which carries the denoised
     images' dark halo) against the same references: a class "matches a real view better
     than a blob" when its score beats the blob's, and the margin says by how much. For
     scale, each tutorial average is scored against the other 31 and the projections too;
   - noise texture (:func:`napari_class2d.texture.texture_measures`: contrast that fills the
     mask, or power in fine detail); blank (an empty class written as a constant image);
   - agreement with the tutorial's RELION classification (``rlnClassNumber`` of the
     extracted STAR): normalised mutual information (and what shuffled labels give), and for
     each of RELION's ten largest classes the share of its particles in our class that holds
     most of them, and in our class whose average best matches its tutorial average;
   - wall and CPU time of the classification.
4. Draws ``OUT/real_betagal_classes.png`` (``--png``): each populated class, largest first,
   next to its best tutorial average and best map projection, each put in the pose that
   matches the class, with the scores.

Usage::

    python benchmarks/real_betagal.py [--out DIR] [--reuse] [--reuse-job] [--n N]
        [--classes 50] [--seed 0] [--set KEY=VALUE ...] [--threads T] [--png PNG]
        [--relion [--relion-iter 25]]

``--reuse-job`` measures the classification already in ``OUT/class2d`` again without
re-running it; ``--n N`` takes the first N particles only. ``--relion`` classifies the same
particles with RELION 3.1's Class2D instead (``relion_refine`` as its GUI runs a Class2D job,
:func:`relion_baseline.relion_command`, without CTF correction since the particles have
none; K, seed and threads from ``--classes``, ``--seed``, ``--threads``; in ``OUT/relion``)
and judges its last iteration the same way: the established tool on the same particles, so
that our figures have a peer. The input RELION reads is the extracted STAR without the
tutorial's class numbers (``OUT/particles/relion_input.star``); with ``--reuse-job`` a run
already there is judged at the last iteration it finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    SHARED_DATA,
    add_set_argument,
    children_cpu_s,
    machine,
    parse_overrides,
    peak_rss_mb,
    write_json,
)
from _realdata import (
    classify,
    equivalent_diameter_A,
    finite,
    map_projections,
    nearest_neighbour_direction,
    neighbour_alignment,
    normalised_mutual_information,
    read_result,
    round_blobs,
    save_figure,
    show,
    shuffled_nmi,
)

from napari_class2d.io.readers import read_particles

DATA = SHARED_DATA / "real_micrographs" / "betagal_empiar10017_cryosegnet"
TOOL = SHARED_DATA.parent / "tools" / "extract_particles.py"
MAP = SHARED_DATA / "maps" / "relion_betagal_ref_model_100px_3.54A.mrc"
DIAMETER_A = 200.0  # the RELION tutorial's mask diameter for β-gal
TUTORIAL_BAND_A = (100.0, 15.0)
MAP_BAND_A = (100.0, 30.0)  # the map holds nothing finer than ~40 Å
MAX_SHIFT_A = 25.0  # classes, tutorial averages and projections are all centred
MICROGRAPH_APIX = 1.77  # pixel size of the micrographs (and of the picks' coordinates), Å
TUTORIAL_STAR = SHARED_DATA / "star_files" / "relion1_betagal_tests" / "ap_s_c2d.star"


def extract(out: Path, n: int | None, reuse: bool) -> Path:
    """Tutorial particles -> ``out/particles.star`` (box 100 at 3.54 Å, inverted)."""
    star = out / "particles.star"
    stamp = out / "extraction.json"
    want = {"coords": "coords_relion_tutorial.star", "limit": n or 0}
    if reuse and star.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"reusing the extraction in {out}", flush=True)
        return star
    for path in (TOOL, DATA / "coords_relion_tutorial.star", DATA / "micrographs"):
        if not path.exists():
            sys.exit(
                f"{path} not found (set NAPARI_CLASS2D_SHARED_DATA to the shared data folder)"
            )
    cmd = [
        sys.executable,
        str(TOOL),
        str(DATA / "coords_relion_tutorial.star"),
        str(DATA / "micrographs"),
        str(out),
        "--apix",
        "1.77",
        "--box",
        "200",
        "--bin",
        "2",
        "--invert",
    ]
    if n:
        cmd += ["--limit", str(n)]
    print("extracting:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    stamp.write_text(json.dumps(want))
    return star


def run_relion(star: Path, out: Path, args) -> tuple[Path, dict]:
    """RELION 3.1's Class2D on the particles of ``star`` (see the module docstring).

    Returns the folder to judge (the last finished iteration's files linked as
    ``run_data.star``, ``run_classes.mrcs`` and ``run_model.star``) and the run's record.
    """
    import shutil
    import types

    import starfile
    from relion_baseline import model_file_times, relion_command

    rel = out / "relion"
    prefix = rel / "run"
    record_path = rel / "relion_run.json"
    started = bool(model_file_times(prefix, args.relion_iter))
    if not (args.reuse_job and (record_path.is_file() or started)):
        if started:  # never over a run already there
            sys.exit(f"{rel} holds a RELION run: --reuse-job judges it, or remove it first")
        if shutil.which("relion_refine") is None:
            sys.exit("relion_refine not found: install RELION (Debian: apt-get install relion)")
        tables = starfile.read(star, always_dict=True)
        theirs = ("rlnClassNumber", "rlnAutopickFigureOfMerit")  # the tutorial's, not an input
        tables["particles"] = tables["particles"].drop(columns=list(theirs), errors="ignore")
        given = star.parent / "relion_input.star"  # beside the stacks its image names point to
        starfile.write(tables, given, overwrite=True)
        rel.mkdir(parents=True, exist_ok=True)
        options = types.SimpleNamespace(
            iter=args.relion_iter,
            classes=args.classes,
            threads=args.threads or 1,
            seed=args.seed,
            extra="",
        )
        cmd = [c for c in relion_command(given.name, prefix, options, DIAMETER_A) if c != "--ctf"]
        print("running:", " ".join(cmd), flush=True)
        t0, c0 = time.perf_counter(), children_cpu_s()
        with open(rel / "relion.log", "w") as log:
            subprocess.run(cmd, cwd=star.parent, check=True, stdout=log, stderr=subprocess.STDOUT)
        record = {
            "command": cmd,
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(children_cpu_s() - c0, 1),
            "program": "relion_refine (RELION 3.1)",
        }
        write_json(record_path, record)
    # a run still going (or stopped) has no record yet: judged without its times
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.setdefault("wall_s", None)
    record.setdefault("cpu_s", None)
    # iteration 0 is the start: no particle has a class yet
    it = len(model_file_times(prefix, args.relion_iter)) - 1
    if it < 1:
        sys.exit(f"no finished RELION iteration in {rel}")
    record["iteration"] = it
    judged = out / "relion_judged"
    judged.mkdir(exist_ok=True)
    for ours, theirs in (
        ("run_data.star", f"_it{it:03d}_data.star"),
        ("run_classes.mrcs", f"_it{it:03d}_classes.mrcs"),
        ("run_model.star", f"_it{it:03d}_model.star"),
    ):
        link = judged / ours
        link.unlink(missing_ok=True)
        link.symlink_to(Path(str(prefix) + theirs).resolve())
    return judged, record


def engine_version() -> dict:
    """Where the classifier ran from: the package folder, its git commit, local changes."""
    import napari_class2d

    where = Path(napari_class2d.__file__).parent

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "package": str(where),
        "commit": git("rev-parse", "--short", "HEAD"),
        "engine_changed_since_commit": bool(git("status", "--porcelain", "--", "engine")),
    }


def mean_particle(particles_star: Path) -> np.ndarray:
    """Plain (unaligned) mean of every particle of a set, read stack by stack."""
    import mrcfile

    total, n = None, 0
    for stack in sorted((particles_star.parent / "Particles").glob("*.mrcs")):
        data = mrcfile.read(stack).astype(np.float64)
        total = data.sum(0) if total is None else total + data.sum(0)
        n += len(data)
    return (total / n).astype(np.float32)


def rotational_average(image: np.ndarray) -> np.ndarray:
    """The image averaged over all in-plane angles about the box centre (1-pixel rings)."""
    box = image.shape[-1]
    c = np.arange(box) - box // 2
    ring = np.rint(np.hypot(*np.meshgrid(c, c, indexing="ij"))).astype(int)
    profile = np.bincount(ring.ravel(), image.ravel()) / np.bincount(ring.ravel())
    return profile[ring].astype(np.float32)


def image_key(names):
    """``index@stack-file-name`` of RELION image names (folders dropped, index as integer)."""
    parts = names.astype(str).str.split("@", n=1, expand=True)
    return parts[0].astype(int).astype(str) + "@" + parts[1].map(lambda p: Path(p).name)


def tutorial_references() -> dict:
    import mrcfile
    import starfile

    images = mrcfile.read(DATA / "relion_tutorial_class_averages.mrcs").astype(np.float32)
    table = starfile.read(DATA / "relion_tutorial_class_averages.star", always_dict=True)
    table = next(iter(table.values()))
    index = table["rlnReferenceImage"].str.split("@").str[0].astype(int).to_numpy() - 1
    return {
        "images": images[index],
        "class_number": table["rlnClassNumber"].to_numpy(int),
        "n_particles": table["rlnClassDistribution"].to_numpy(int),
    }


def tutorial_neighbour_alignment() -> dict:
    """:func:`neighbour_alignment` of the tutorial's own classification (its ψ, read from
    ``ap_s_c2d.star`` in the raw micrographs' frame, matched to the JPEG-frame picks of
    ``coords_relion_tutorial.star`` micrograph by micrograph, in order)."""
    import starfile

    picks = starfile.read(DATA / "coords_relion_tutorial.star", always_dict=True)
    picks = next(iter(picks.values()))
    raw = starfile.read(TUTORIAL_STAR, always_dict=True)
    raw = next(iter(raw.values()))
    stem = raw["rlnMicrographName"].map(lambda p: Path(p).stem)
    psi = np.full(len(picks), np.nan)
    for name, rows in picks.groupby("rlnMicrographName").indices.items():
        theirs = raw[stem == Path(name).stem]
        x_raw = theirs["rlnCoordinateX"].to_numpy(float)
        x_jpeg = picks["rlnCoordinateX"].to_numpy(float)[rows]
        # the JPEG frame is the raw micrograph's (binned 2) scaled by 2 and offset
        if len(theirs) != len(rows) or np.ptp(x_jpeg - 2.0 * x_raw) > 6.0:
            raise RuntimeError(f"{name}: picks do not match {TUTORIAL_STAR.name}")
        psi[rows] = theirs["rlnAnglePsi"].to_numpy(float)
    xy_A = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) * MICROGRAPH_APIX
    direction = nearest_neighbour_direction(picks["rlnMicrographName"], xy_A, DIAMETER_A)
    # the JPEG frame flips y: the raw frame's ψ turns the other way
    return neighbour_alignment(direction, picks["rlnClassNumber"].to_numpy(int), psi, sign=-1.0)


def shift_statistics(origins_A: np.ndarray) -> dict:
    """Median and 90th percentile of the particles' distances from their picks, Å."""
    d = np.linalg.norm(np.asarray(origins_A, dtype=float), axis=1)
    return {
        "median_A": round(float(np.median(d)), 1),
        "p90_A": round(float(np.percentile(d, 90)), 1),
    }


def tutorial_shifts() -> dict:
    """:func:`shift_statistics` of RELION's tutorial classification (``ap_s_c2d.star``: origins
    in pixels of its 3.54 Å particles, i.e. 14 µm detector pixels at 39,548x)."""
    import starfile

    raw = next(iter(starfile.read(TUTORIAL_STAR, always_dict=True).values()))
    apix = (
        1e4 * raw["rlnDetectorPixelSize"].to_numpy(float) / raw["rlnMagnification"].to_numpy(float)
    )
    origins = raw[["rlnOriginX", "rlnOriginY"]].to_numpy(float) * apix[:, None]
    return shift_statistics(origins)


def measure(job_dir: Path, particles_star: Path, n_directions: int) -> dict:
    """Every figure of the module docstring's step 3, per class and in summary."""
    import starfile
    import torch

    from napari_class2d.compare import match_images
    from napari_class2d.texture import (
        FINE_POWER_THRESHOLD,
        NOISE_TEXTURE_THRESHOLD,
        texture_measures,
    )

    res = read_result(job_dir)
    avg, apix = res["averages"], res["pixel_size_A"]
    K, box = avg.shape[0], avg.shape[-1]
    # the job writes absolute stack paths: match particles by index and stack file name
    ours = res["particles"][["rlnImageName", "rlnClassNumber", "rlnAnglePsi"]].copy()
    theirs = starfile.read(particles_star, always_dict=True)["particles"]
    # direction to each pick's nearest neighbour (the picks are in micrograph pixels)
    theirs["neighbour_deg"] = nearest_neighbour_direction(
        theirs["rlnMicrographName"],
        theirs[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) * MICROGRAPH_APIX,
        DIAMETER_A,
    )
    theirs = theirs[["rlnImageName", "rlnClassNumber", "neighbour_deg"]].rename(
        columns={"rlnClassNumber": "tutorial"}
    )
    for table in (ours, theirs):
        table["key"] = image_key(table.pop("rlnImageName"))
    both = ours.merge(theirs, on="key", how="inner", validate="one_to_one")
    if len(both) != len(ours):
        raise RuntimeError(f"{len(ours) - len(both)} particles of the job not in {particles_star}")
    our_class = both["rlnClassNumber"].to_numpy(int)
    their_class = both["tutorial"].to_numpy(int)
    counts = np.bincount(our_class, minlength=K + 1)[1:]
    neighbours = {
        "ours": neighbour_alignment(
            both["neighbour_deg"].to_numpy(float), our_class, both["rlnAnglePsi"].to_numpy(float)
        ),
        "tutorial": tutorial_neighbour_alignment(),
    }

    tut = tutorial_references()
    proj = map_projections(MAP, apix, box, n_directions)
    if tut["images"].shape[-1] != box or abs(proj["info"]["resampled_pixel_size_A"] - apix) > 0.01:
        raise RuntimeError(f"class averages ({box} px, {apix} Å) are not on the references' grid")
    blob_d = equivalent_diameter_A(proj["images"], apix)
    blobs = round_blobs(box, apix, blob_d)
    blobs["round average of the particles"] = rotational_average(mean_particle(particles_star))
    blob_names = list(blobs)
    blob_img = torch.from_numpy(np.stack(list(blobs.values())).astype(np.float32))

    tex = texture_measures(avg, apix, DIAMETER_A)
    blank, oef, fpf = tex["blank"], tex["outer_energy_fraction"], tex["fine_power_fraction"]
    live = np.nonzero((counts > 0) & ~blank)[0]
    t0 = time.perf_counter()
    x = torch.from_numpy(avg[live])
    ref_t, ref_p = torch.from_numpy(tut["images"]), torch.from_numpy(proj["images"])
    kw = {"mask_diameter_A": DIAMETER_A, "max_shift_A": MAX_SHIFT_A}
    kw_t = dict(kw, band_A=TUTORIAL_BAND_A)
    kw_p = dict(kw, band_A=MAP_BAND_A, rotation_step_deg=5.0)
    m_tut = match_images(x, ref_t, apix, **kw_t)
    m_proj = match_images(x, ref_p, apix, **kw_p)
    # the baseline: how well a round blob matches the same references, searched the same way
    b_tut = match_images(blob_img, ref_t, apix, **kw_t).score.max(dim=1).values
    b_proj = match_images(blob_img, ref_p, apix, **kw_p).score.max(dim=1).values
    base_t, base_p = float(b_tut.max()), float(b_proj.max())
    # what a real view scores: each tutorial average against the other 31 and the projections
    t_t = match_images(ref_t, ref_t, apix, **kw_t).score
    t_t.fill_diagonal_(-1.0)
    t_p = match_images(ref_t, ref_p, apix, **kw_p).score
    match_s = time.perf_counter() - t0

    per_class = []
    for k in range(K):
        entry = {
            "class": k + 1,
            "n_particles": int(counts[k]),
            "blank": bool(blank[k]),
            "resolution_A": finite(res["resolution_A"][k]),
            "outer_energy_fraction": None if np.isnan(oef[k]) else round(float(oef[k]), 3),
            "fine_power_fraction": None if np.isnan(fpf[k]) else round(float(fpf[k]), 3),
            "noise_texture": bool(tex["noise_texture"][k]),
        }
        if k in live:
            i = int(np.searchsorted(live, k))
            t = int(m_tut.score[i].argmax())
            p = int(m_proj.score[i].argmax())
            st, sp = float(m_tut.score[i, t]), float(m_proj.score[i, p])
            entry.update(
                {
                    "tutorial_class": int(tut["class_number"][t]),
                    "tutorial_index": t,
                    "tutorial_score": round(st, 3),
                    "tutorial_psi_deg": round(float(m_tut.psi_deg[i, t]), 1),
                    "tutorial_shift_A": [round(float(v), 2) for v in m_tut.shift_A[i, t]],
                    "better_than_blob": st > base_t,
                    "margin": round(st - base_t, 3),
                    "projection_index": p,
                    "projection_rot_tilt_deg": [
                        round(float(proj["rot_deg"][p]), 1),
                        round(float(proj["tilt_deg"][p]), 1),
                    ],
                    "projection_score": round(sp, 3),
                    "projection_psi_deg": round(float(m_proj.psi_deg[i, p]), 1),
                    "projection_shift_A": [round(float(v), 2) for v in m_proj.shift_A[i, p]],
                    "projection_better_than_blob": sp > base_p,
                    "projection_margin": round(sp - base_p, 3),
                }
            )
        per_class.append(entry)

    # agreement with the tutorial's classification
    nmi = normalised_mutual_information(our_class, their_class)
    chance = shuffled_nmi(our_class, their_class)
    top = []
    for c in tut["class_number"][:10]:
        of_c = our_class[their_class == c]
        if len(of_c) == 0:  # a subset (--n) may hold none of them
            continue
        by_particles = int(np.bincount(of_c).argmax())
        t = int(np.nonzero(tut["class_number"] == c)[0][0])
        live_scores = m_tut.score[:, t]
        by_image = int(live[int(live_scores.argmax())]) + 1
        top.append(
            {
                "tutorial_class": int(c),
                "n_particles": int(len(of_c)),
                "our_class_by_particles": by_particles,
                "share_in_it": round(float(np.mean(of_c == by_particles)), 3),
                "its_purity": round(
                    float(np.mean(their_class[our_class == by_particles] == c)), 3
                ),
                "our_class_by_image": by_image,
                "image_score": round(float(live_scores.max()), 3),
                "share_in_class_by_image": round(float(np.mean(of_c == by_image)), 3),
            }
        )

    populated = [e for e in per_class if e["n_particles"] > 0]
    pop20 = [e for e in populated if e["n_particles"] >= 20]
    judged = [e for e in pop20 if "better_than_blob" in e]
    summary = {
        "n_particles": int(len(our_class)),
        "n_classes": K,
        "classes_populated": len(populated),
        "classes_with_20_or_more": len(pop20),
        "empty_classes": K - len(populated),
        "blank_averages": int(blank.sum()),
        "empty_classes_left_blank": int(sum(blank[k] for k in range(K) if counts[k] == 0)),
        "noise_textures_among_populated": sum(e["noise_texture"] for e in populated),
        "noise_textures_among_20_or_more": sum(e["noise_texture"] for e in pop20),
        "better_than_blob_tutorial": f"{sum(e['better_than_blob'] for e in judged)}/{len(judged)}",
        "better_than_blob_map": (
            f"{sum(e['projection_better_than_blob'] for e in judged)}/{len(judged)}"
        ),
        "median_margin_tutorial": _median([e["margin"] for e in judged]),
        "median_margin_map": _median([e["projection_margin"] for e in judged]),
        "nmi": round(nmi, 4),
        "nmi_shuffled": round(chance, 4),
        "largest_class_share": round(float(counts.max() / max(counts.sum(), 1)), 3),
        "top10_share_by_particles": [e["share_in_it"] for e in top],
        "top10_share_by_image": [e["share_in_class_by_image"] for e in top],
        "neighbour_alignment_median_R": neighbours["ours"]["median_R"],
        "neighbour_alignment_median_R_tutorial": neighbours["tutorial"]["median_R"],
        "neighbour_alignment_median_R_shuffled": neighbours["ours"]["median_R_shuffled"],
        # how far the job moved the particles from their picks, against the tutorial's
        "shifts": shift_statistics(
            res["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
        ),
        "shifts_tutorial": tutorial_shifts(),
    }
    tut_tex = texture_measures(tut["images"], apix, DIAMETER_A)
    reference = {
        "what": "the 32 tutorial averages (real views) scored as our classes are",
        "tutorial_vs_other_tutorial_median": _median(t_t.max(dim=1).values.tolist()),
        "tutorial_vs_other_tutorial_min": round(float(t_t.max(dim=1).values.min()), 3),
        "tutorial_vs_projections_median": _median(t_p.max(dim=1).values.tolist()),
        "tutorial_vs_projections_min": round(float(t_p.max(dim=1).values.min()), 3),
        "outer_energy_fraction_max": round(float(np.nanmax(tut_tex["outer_energy_fraction"])), 3),
        "fine_power_fraction_max": round(float(np.nanmax(tut_tex["fine_power_fraction"])), 3),
        "flagged_as_noise_texture": int(tut_tex["noise_texture"].sum()),
    }
    baseline = {
        "what": "best score of a round blob against the same references, searched the same way",
        "blob_vs_tutorial": round(base_t, 3),
        "blob_vs_projections": round(base_p, 3),
        "per_blob_vs_tutorial": {
            n: round(float(v), 3) for n, v in zip(blob_names, b_tut, strict=True)
        },
        "per_blob_vs_projections": {
            n: round(float(v), 3) for n, v in zip(blob_names, b_proj, strict=True)
        },
    }
    return {
        "summary": summary,
        "per_class": per_class,
        "tutorial_top10": top,
        "neighbour_alignment": neighbours,
        "blob_baseline": baseline,
        "tutorial_averages_as_classes": reference,
        "references": {
            "tutorial_band_A": TUTORIAL_BAND_A,
            "map_band_A": MAP_BAND_A,
            "mask_diameter_A": DIAMETER_A,
            "max_shift_A": MAX_SHIFT_A,
            "map": str(MAP),
            "map_content_resolution_A": proj["info"]["content_resolution_A"],
            "projection_directions": n_directions,
            "blob_diameter_A": round(blob_d, 1),
            "blobs": blob_names,
            "rotation_step_deg": {"tutorial": 3.0, "projections": 5.0},
            "noise_texture_thresholds": {
                "outer_energy_fraction": NOISE_TEXTURE_THRESHOLD,
                "fine_power_fraction": FINE_POWER_THRESHOLD,
            },
            "matching_s": round(match_s, 1),
        },
        "_arrays": {"averages": avg, "tutorial": tut, "projections": proj, "apix": apix},
        "_baseline": (base_t, base_p),
    }


def _median(values) -> float | None:
    return round(float(np.median(values)), 3) if len(values) else None


def montage(result: dict, png: Path, title: str) -> Path:
    """Each populated class (largest first) | its best tutorial average | its best projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from napari_class2d.sim.transforms import rotate_and_shift

    arr = result["_arrays"]
    avg, apix = arr["averages"], arr["apix"]
    shown = sorted(
        (e for e in result["per_class"] if e["n_particles"] > 0),
        key=lambda e: -e["n_particles"],
    )
    per_row = 5
    nrow = max(1, -(-len(shown) // per_row))
    # three panels per class, a narrow empty column between classes
    ratios = ([1.0, 1.0, 1.0, 0.22] * per_row)[:-1]
    fig, axes = plt.subplots(
        nrow,
        len(ratios),
        figsize=(0.98 * sum(ratios) + 0.3, 1.36 * nrow + 0.85),
        squeeze=False,
        gridspec_kw={"width_ratios": ratios, "wspace": 0.06, "hspace": 0.38},
    )
    for ax in axes.ravel():
        ax.axis("off")

    def posed(images, index, psi, shift):
        img = torch.from_numpy(images[index : index + 1])
        return rotate_and_shift(img, torch.tensor([psi]), torch.tensor([shift]), apix)[0].numpy()

    for j, e in enumerate(shown):
        row, col = divmod(j, per_row)
        a, b, c = axes[row, 4 * col : 4 * col + 3]
        for ax in (a, b, c):
            ax.axis("on")
        k = e["class"] - 1
        flag = "TEXTURE" if e["noise_texture"] else "no texture"
        if e["outer_energy_fraction"] is None:
            flag = "blank"
        show(
            a,
            avg[k],
            f"#{e['class']} n={e['n_particles']}\n{flag}",
            "red" if e["noise_texture"] else "black",
        )
        if "tutorial_index" not in e:  # blank average of a populated class
            continue
        tut_img = posed(
            arr["tutorial"]["images"],
            e["tutorial_index"],
            e["tutorial_psi_deg"],
            e["tutorial_shift_A"],
        )
        show(
            b,
            tut_img,
            f"T{e['tutorial_class']} {e['tutorial_score']:.2f}\n{e['margin']:+.2f}",
            "green" if e["better_than_blob"] else "red",
        )
        proj_img = posed(
            arr["projections"]["images"],
            e["projection_index"],
            e["projection_psi_deg"],
            e["projection_shift_A"],
        )
        show(
            c,
            proj_img,
            f"map {e['projection_score']:.2f}\n{e['projection_margin']:+.2f}",
            "green" if e["projection_better_than_blob"] else "red",
        )
    fig.suptitle(title, fontsize=8.5)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / fig.get_figheight())
    out = save_figure(fig, png, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: bench_out/real_betagal")
    ap.add_argument("--reuse", action="store_true", help="reuse an extraction in OUT/particles")
    ap.add_argument("--reuse-job", action="store_true", help="measure OUT/class2d again")
    ap.add_argument("--n", type=int, default=None, help="only the first N particles")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--directions", type=int, default=300, help="map projections (300)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--title", default=None)
    add_set_argument(ap)
    ap.add_argument(
        "--relion",
        action="store_true",
        help="classify with RELION 3.1's Class2D (GUI defaults, no CTF) instead, in OUT/relion",
    )
    ap.add_argument("--relion-iter", type=int, default=25, help="RELION iterations (25)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or REPO / "bench_out" / "real_betagal"
    star = extract(out / "particles", args.n, args.reuse or args.reuse_job)
    job_dir = out / "class2d"
    json_path = out / "real_betagal.json"

    run_path = job_dir / "classification.json"
    if args.relion:
        job_dir, run = run_relion(star, out, args)
        json_path = out / "real_betagal_relion.json"
        print(f"judging RELION's iteration {run['iteration']} ({run['wall_s']} s)", flush=True)
    elif args.reuse_job and (job_dir / "run_data.star").is_file() and run_path.is_file():
        run = json.loads(run_path.read_text())
        print(f"reusing the classification in {job_dir} ({run['wall_s']} s)", flush=True)
    else:
        particles = read_particles(star)
        settings = {
            "n_classes": args.classes,
            "particle_diameter_A": DIAMETER_A,
            "ctf_correction": "off",
            "seed": args.seed,
        }
        settings.update(parse_overrides(args.set))
        print(f"classifying {len(particles)} particles: {settings}", flush=True)
        engine = engine_version()
        run = classify(particles, settings, job_dir)
        run["settings"] = settings
        run["peak_rss_MB"] = round(peak_rss_mb())
        run["engine"] = engine
        run["torch_threads"] = torch.get_num_threads()
        write_json(run_path, run)
        print(f"classified in {run['wall_s']} s wall, {run['cpu_s']} s CPU", flush=True)

    result = measure(job_dir, star, args.directions)
    s = result["summary"]
    s["classification_wall_s"] = run["wall_s"]
    s["classification_cpu_s"] = run["cpu_s"]
    record = {
        "benchmark": "real_betagal",
        "particles_star": str(star),
        "classification": run,
        **{k: v for k, v in result.items() if k != "_arrays"},
        "machine": machine(),
    }
    write_json(json_path, record)

    print(json.dumps(s, indent=2))
    print("baseline:", json.dumps(result["blob_baseline"]))
    print("real views:", json.dumps(result["tutorial_averages_as_classes"]))
    base_t, base_p = result["_baseline"]
    print(
        f" class     n   oef  fine  texture  best tutorial  margin over blob ({base_t:.2f})  "
        f"best projection  margin over blob ({base_p:.2f})"
    )
    for e in sorted(result["per_class"], key=lambda e: -e["n_particles"]):
        if e["n_particles"] == 0:
            continue
        if "tutorial_score" not in e:
            print(f"  {e['class']:3d} {e['n_particles']:5d}  blank")
            continue
        print(
            f"  {e['class']:3d} {e['n_particles']:5d}  {e['outer_energy_fraction']:.2f}  "
            f"{e['fine_power_fraction']:.2f}  "
            f"{'TEXTURE' if e['noise_texture'] else '-':7s}  T{e['tutorial_class']:<3d} "
            f"{e['tutorial_score']:.2f}      {e['margin']:+.2f} "
            f"{'(better)' if e['better_than_blob'] else '        '}"
            f"                {e['projection_score']:.2f}        {e['projection_margin']:+.2f} "
            f"{'(better)' if e['projection_better_than_blob'] else ''}"
        )
    print(" RELION class   n  -> ours (share, purity)   by image -> ours (score, share)")
    for e in result["tutorial_top10"]:
        print(
            f"  {e['tutorial_class']:3d}  {e['n_particles']:5d}  -> "
            f"{e['our_class_by_particles']:3d} "
            f"({e['share_in_it']:.2f}, {e['its_purity']:.2f})          -> "
            f"{e['our_class_by_image']:3d} ({e['image_score']:.2f}, "
            f"{e['share_in_class_by_image']:.2f})"
        )
    who = "RELION 3.1, " if args.relion else ""
    title = args.title or (
        f"{who}β-gal (EMPIAR-10017, {s['n_particles']} tutorial particles), K = {s['n_classes']}: "
        f"{s['classes_populated']} populated, {s['classes_with_20_or_more']} with ≥ 20, "
        f"{s['noise_textures_among_populated']} noise textures; NMI with RELION {s['nmi']:.3f}"
        f"\neach class (n particles, noise-texture check) | its best tutorial average | its best "
        f"map projection, both posed on the class:\nnormalised cross-correlation and, below, the "
        f"margin over a round blob's best ({base_t:.2f} | {base_p:.2f}); green: better than the "
        f"blob"
    )
    default_png = out / (
        "real_betagal_relion_classes.png" if args.relion else "real_betagal_classes.png"
    )
    png = montage(result, args.png or default_png, title)
    print(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
