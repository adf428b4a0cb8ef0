"""Speed benchmark: the machine's FFT and GEMM throughput and the engine's E-step rate.

All in one run, so the engine's rate can be read against what the hardware
does on the two kernels the E-step is built from:

* FFT: batched ``torch.fft.rfft2`` + ``irfft2`` of float32 images at box 96
  (images/s and GFLOP/s counting ``2.5 N log2 N`` flops per real 2D FFT);
* GEMM: float32 ``matmul`` GFLOP/s, square 2048 and an E-step-like shape
  ``(512 x 1400) @ (1400 x 3600)`` (particles x Fourier terms x class-poses);
* engine: a short Class2DJob on a simulated set (default: 3000 particles,
  box 96, K=50, 4 online iterations + 1 full) reporting the engine's own
  ``timings["evaluations_per_s"]`` (particle x class x pose evaluations per
  second of search time) and ``n_evaluations``.

Ratios printed: engine evaluations/s against the GEMM bound of a brute-force
search over the full alignment band (4 flops per Fourier term per evaluation,
real arithmetic on complex data; a coarse-to-fine search can beat it because
its coarse pass uses fewer terms), evaluations per box-96 FFT time, and the
per-particle search time. Usage::

    python benchmarks/speed.py [--threads N] [--device cpu|cuda] [--out DIR] [--n 3000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    add_set_argument,
    machine,
    parse_overrides,
    peak_rss_mb,
    simulate_in_child,
    write_json,
)


def _best_of(fn, repeats: int = 3, min_time: float = 0.3) -> float:
    """Best time per call in seconds (each repeat runs ``fn`` for at least ``min_time``)."""
    best = math.inf
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def fft_throughput(torch, device: str, box: int = 96, batch: int = 512) -> dict:
    x = torch.randn(batch, box, box, device=device)

    def run():
        y = torch.fft.irfft2(torch.fft.rfft2(x), s=(box, box))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return y

    t = _best_of(run)
    flops = 2 * batch * 2.5 * box * box * math.log2(box * box)  # forward + inverse
    return {
        "box": box,
        "batch": batch,
        "images_per_s": 2 * batch / t,  # one forward or inverse transform = one image
        "GFLOP_per_s": flops / t / 1e9,
    }


def gemm_throughput(torch, device: str) -> dict:
    out = {}
    for name, (m, k, n) in {
        "square_2048": (2048, 2048, 2048),
        "estep_like": (512, 1400, 3600),
    }.items():
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)

        def run(a=a, b=b):
            c = a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return c

        t = _best_of(run)
        out[name] = {"shape": [m, k, n], "GFLOP_per_s": 2 * m * k * n / t / 1e9}
    return out


def engine_throughput(star: Path, n_classes: int, device: str, overrides: dict) -> dict:
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles

    particles = read_particles(star)
    settings = {
        "n_classes": n_classes,
        "max_res_A": 6.0,
        "n_online_em_iterations": 4,
        "batch_size_per_class": 20,
        "n_final_full_iterations": 1,
        "device": device,
    }
    settings.update(overrides)
    config = Class2DConfig(**settings).validate()
    resolved = config.resolve(particles.box, float(particles.pixel_size_A[0]))
    job = Class2DJob(particles, config)
    rows = []
    t0 = time.perf_counter()
    for snap in job.run():
        t = snap.timings
        rows.append(
            {
                "iteration": snap.iteration,
                "phase": snap.phase,
                "n_particles": snap.n_particles_used,
                "search_s": float(t.get("search_s", float("nan"))),
                "e_step_s": float(t.get("e_step_s", float("nan"))),
                "m_step_s": float(t.get("m_step_s", float("nan"))),
                "n_evaluations": float(t.get("n_evaluations", float("nan"))),
                "evaluations_per_s": float(t.get("evaluations_per_s", float("nan"))),
            }
        )
    wall = time.perf_counter() - t0
    # Fourier terms inside the alignment band at the working box (rfft half plane)
    r = resolved.working_box * resolved.working_pixel_size_A / resolved.max_align_res_A
    n_terms = math.pi * r * r / 2
    return {
        "config": config.to_dict(),
        "working_box": resolved.working_box,
        "fourier_terms_in_band": round(n_terms),
        "iterations": rows,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=3000, help="particles simulated for the engine run")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "speed")
    ap.add_argument("--no-engine", action="store_true", help="only FFT and GEMM")
    add_set_argument(ap, help="Class2DConfig overrides for the engine run")
    args = ap.parse_args(argv)

    sim_dir = args.out / "sim"
    if not args.no_engine and not (sim_dir / "particles.star").is_file():
        print(f"simulating {args.n} particles for the engine run ...", flush=True)
        simulate_in_child(sim_dir, n_particles=args.n, box=96, pixel_size_A=3.0, overwrite=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fft = fft_throughput(torch, args.device)
    print(f"FFT  box 96: {fft['images_per_s']:10.0f} images/s  {fft['GFLOP_per_s']:6.1f} GFLOP/s")
    gemm = gemm_throughput(torch, args.device)
    for name, g in gemm.items():
        print(f"GEMM {name:12s} {g['shape']}: {g['GFLOP_per_s']:6.1f} GFLOP/s")
    result = {"machine": machine(), "fft": fft, "gemm": gemm}

    if not args.no_engine:
        eng = engine_throughput(
            sim_dir / "particles.star", args.classes, args.device, parse_overrides(args.set)
        )
        result["engine"] = eng
        f = eng["fourier_terms_in_band"]
        gemm_rate = gemm["estep_like"]["GFLOP_per_s"] * 1e9
        bound = gemm_rate / (4 * f)
        print(f"engine: working box {eng['working_box']}, ~{f} Fourier terms in the band")
        print(f"  GEMM bound at 4 flops/term: {bound / 1e6:8.1f} M evaluations/s")
        for row in eng["iterations"]:
            per_particle_ms = 1e3 * row["search_s"] / max(row["n_particles"], 1)
            print(
                f"  it {row['iteration']:2d} {row['phase']:7s} {row['n_particles']:5d} particles "
                f"search {row['search_s']:6.2f} s ({per_particle_ms:6.2f} ms/particle)  "
                f"{row['evaluations_per_s'] / 1e6:8.2f} M evals/s = "
                f"{row['evaluations_per_s'] / bound:5.2f} x the full-band GEMM bound, "
                f"{row['evaluations_per_s'] / fft['images_per_s']:5.0f} evals per FFT time"
            )
        eng["gemm_bound_evaluations_per_s"] = bound
    result["peak_rss_MB"] = peak_rss_mb()
    write_json(args.out / "speed.json", result)
    print(f"wrote {args.out / 'speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
