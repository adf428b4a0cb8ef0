"""Run one classification job and record where its time and memory go.

Shared by ``million.py`` (one process on the CPU) and ``gpu.py`` (one or several
processes under ``torchrun``). A job's wall time is split into phases: reading the
STAR file, preprocessing (reading the stacks and writing the particle cache),
initialisation, the online and the full iterations (compute only), checkpoints and
RELION outputs (rank 0 writes them; the other processes wait for it at the next
collective, so their iteration times include that wait). Each phase also gets the CPU
time of the process (user + system), which other work on a shared machine disturbs
much less than the wall time. Memory: anonymous and file-backed resident memory of the
process, sampled (``MemorySampler``), and on a GPU the peak allocated by torch per phase.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from _common import REPO, MemorySampler, write_json


def engine_commit() -> str:
    """The commit of the code being measured (and whether the tree has changes);
    ``NAPARI_CLASS2D_COMMIT`` when set (a run from an exported copy of the code)."""
    if os.environ.get("NAPARI_CLASS2D_COMMIT"):
        return os.environ["NAPARI_CLASS2D_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_recorded(
    star: str | Path,
    job_dir: str | Path,
    settings: dict,
    record_path: str | Path | None = None,
    series_every_s: float = 1.0,
    profile_iteration: int | None = None,
    trace_path: str | Path | None = None,
) -> dict:
    """Run the default schedule of ``settings`` on ``star`` into ``job_dir``; return the
    record (also written to ``record_path`` after every iteration, so a run that is
    stopped leaves what it measured).

    ``profile_iteration``: iteration traced with ``torch.profiler`` (a Chrome trace in
    ``trace_path``); the record then counts its host-device copies and synchronisations
    (``profile``), to check that the iteration loop on a GPU makes none per chunk.
    """
    import torch

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles

    config = Class2DConfig(**settings).validate()
    c0 = time.process_time()
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    rows: list[dict] = []
    record: dict = {"settings": settings, "engine_commit": engine_commit(), "complete": False}
    with MemorySampler(series_every_s=series_every_s) as memory:
        progress = _Progress(record, memory, t0, record_path)
        particles = read_particles(star)
        marks["read_star_s"] = time.perf_counter() - t0
        marks["read_star_cpu_s"] = time.process_time() - c0
        job = Class2DJob(particles, config, out_dir=job_dir, overwrite=True)
        cpu = _CpuTimes(job)
        device = job.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        original = job._initialise

        def initialise() -> None:
            marks["initialisation_start_s"] = time.perf_counter() - t0
            marks["preprocessing_cpu_s"] = time.process_time() - c0 - marks["read_star_cpu_s"]
            c1 = time.process_time()
            original()
            marks["initialisation_cpu_s"] = time.process_time() - c1
            progress.watch(job.pool)

        job._initialise = initialise
        previous_t = None
        previous_cpu = None
        previous_seconds = dict(job.seconds)
        profiler = None
        for snap in job.run():
            if profiler is not None:  # the traced iteration has ended
                profiler.__exit__(None, None, None)
                record["profile"] = _profile_summary(profiler, snap.iteration, trace_path)
                profiler = None
            if cuda:
                torch.cuda.synchronize(device)
            now = time.perf_counter() - t0
            cpu_now = time.process_time() - c0
            cpu_outside = cpu.take()  # checkpoint and outputs of this step
            if previous_cpu is None:  # the first step also read and preprocessed
                previous_cpu = marks["read_star_cpu_s"] + marks.get("preprocessing_cpu_s", 0.0)
                cpu_outside += marks.get("initialisation_cpu_s", 0.0)
            spent = {k: v - previous_seconds.get(k, 0.0) for k, v in job.seconds.items()}
            previous_seconds = dict(job.seconds)
            start = previous_t if previous_t is not None else marks["read_star_s"]
            outside = sum(spent.values())  # preprocessing, initialisation, checkpoint, outputs
            t = snap.timings
            row = {
                "iteration": snap.iteration,
                "phase": snap.phase,
                "n_particles": snap.n_particles_used,
                # share of the particles whose rotations were marginalised
                "marginalised": float(
                    t.get("marginalised_fraction", t.get("marginalised_poses", 0.0))
                ),
                "iteration_s": now - start - outside,
                "iteration_cpu_s": cpu_now - previous_cpu - cpu_outside,
                "e_step_s": float(t.get("e_step_s", 0.0)),
                "m_step_s": float(t.get("m_step_s", 0.0)),
                "search_s": float(t.get("search_s", 0.0)),
                "references_s": float(t.get("references_s", 0.0)),
                "checkpoint_and_outputs_s": spent["checkpoints"] + spent["outputs"],
                "ended_at_s": now,
                "rss": MemorySampler.current(),
            }
            if cuda:
                row["gpu_peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            progress.iteration_ended(snap.iteration)
            previous_t, previous_cpu = now, cpu_now
            if job.reducer.is_main:
                print(_line(row), flush=True)
            if record_path is not None:
                record.update(_summary(job, marks, rows, memory, now))
                write_json(Path(record_path), record)
            if profile_iteration is not None and snap.iteration == profile_iteration - 1:
                profiler = _start_profiler(cuda)
    wall = time.perf_counter() - t0
    record.update(_summary(job, marks, rows, memory, wall))
    record["complete"] = job.done
    record["peak_anon_MB"] = memory.peak_anon_MB
    record["peak_file_MB"] = memory.peak_file_MB
    record["memory_series"] = memory.series
    record["checkpoints_and_outputs_cpu_s"] = cpu.total
    record["cpu_s"] = time.process_time() - c0
    record["world_size"] = job.reducer.world_size
    record["rank"] = job.reducer.rank
    record["device"] = str(device)
    record["n_particles_held"] = job.pool.n_held
    if cuda:
        record["gpu_name"] = torch.cuda.get_device_name(device)
    if record_path is not None:
        write_json(Path(record_path), record)
    return record


class _Progress:
    """Progress inside an iteration, for a run stopped before a long iteration ends.

    Counts the particles the iteration has read from the cache (``pool.get`` wrapped)
    and every ``every_s`` seconds appends ``(seconds since start, iteration, particles
    read so far in it, anonymous MiB)`` to ``record["progress"]`` and writes the record
    with the memory series so far: a full iteration of a million particles on two
    cores takes hours, and its rate and memory are measured before it ends.
    """

    def __init__(self, record: dict, memory: MemorySampler, t0: float, path, every_s=60.0):
        self.record, self.memory, self.t0, self.path = record, memory, t0, path
        self.every_s = every_s
        self.iteration = 1
        self.read = 0
        self.last = 0.0
        record["progress"] = []

    def watch(self, pool) -> None:
        get = pool.get

        def counted(indices, *args, **kwargs):
            self.read += len(indices)
            now = time.perf_counter() - self.t0
            if now - self.last >= self.every_s:
                self.last = now
                anon = MemorySampler.current().get("RssAnon", 0.0)
                self.record["progress"].append((now, self.iteration, self.read, anon))
                if self.path is not None:
                    self.record["memory_series"] = list(self.memory.series)
                    write_json(Path(self.path), self.record)
            return get(indices, *args, **kwargs)

        pool.get = counted

    def iteration_ended(self, iteration: int) -> None:
        self.iteration, self.read = iteration + 1, 0


class _CpuTimes:
    """CPU time the job spends writing checkpoints and outputs (its methods wrapped)."""

    def __init__(self, job):
        self.pending = 0.0
        self.total = 0.0
        for name in ("save_checkpoint", "_write_outputs_timed"):
            setattr(job, name, self._timed(getattr(job, name)))

    def _timed(self, method):
        def wrapped(*args, **kwargs):
            c = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                spent = time.process_time() - c
                self.pending += spent
                self.total += spent

        return wrapped

    def take(self) -> float:
        spent, self.pending = self.pending, 0.0
        return spent


def _start_profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def _profile_summary(profiler, iteration: int, trace_path) -> dict:
    """Host-device copies and synchronisations of the traced iteration (the checkpoint
    and the outputs rank 0 writes after it included)."""
    if trace_path is not None:
        profiler.export_chrome_trace(str(trace_path))
    # on a GPU: copies and synchronisations; the operators behind them (a tensor read as a
    # Python number, a boolean mask's count) are counted on a CPU run as well
    watched = ("Memcpy", "Synchronize", "aten::_local_scalar_dense", "aten::nonzero")
    counts = {
        e.key: int(e.count) for e in profiler.key_averages() if any(w in e.key for w in watched)
    }
    return {"iteration": iteration, "trace": str(trace_path), "events": counts}


def _line(row: dict) -> str:
    rss = row["rss"]
    return (
        f"  it {row['iteration']:3d} {row['phase']:7s} {row['n_particles']:8d} particles "
        f"{row['iteration_s']:8.1f} s (+ {row['checkpoint_and_outputs_s']:5.1f} s "
        f"checkpoint/outputs), anonymous {rss.get('RssAnon', 0):6.0f} MiB, "
        f"file-backed {rss.get('RssFile', 0):6.0f} MiB, at {row['ended_at_s']:8.1f} s"
    )


def _summary(job, marks: dict, rows: list[dict], memory: MemorySampler, now: float) -> dict:
    """Per-phase totals of the rows so far."""
    phases: dict[str, dict] = {}
    for kind in ("online", "full"):
        sel = [r for r in rows if r["phase"] == kind]
        total = sum(r["iteration_s"] for r in sel)
        n = sum(r["n_particles"] for r in sel)
        phases[kind] = {
            "iterations": len(sel),
            "seconds": total,
            "cpu_seconds": sum(r["iteration_cpu_s"] for r in sel),
            "particles": n,
            "particles_per_s": n / total if total > 0 else None,
            "marginalised_particles": sum(r["marginalised"] * r["n_particles"] for r in sel),
        }
    seconds = dict(job.seconds)
    n = job.n_particles
    return {
        "n_particles": n,
        "wall_s": now,
        "read_star_s": marks.get("read_star_s"),
        "read_star_cpu_s": marks.get("read_star_cpu_s"),
        "preprocessing_cpu_s": marks.get("preprocessing_cpu_s"),
        "initialisation_cpu_s": marks.get("initialisation_cpu_s"),
        "preprocessing_s": seconds["preprocessing"],
        "preprocessing_particles_per_s": n / seconds["preprocessing"]
        if seconds["preprocessing"] > 0
        else None,
        "initialisation_s": seconds["initialisation"],
        "online": phases["online"],
        "full": phases["full"],
        "checkpoints_s": seconds["checkpoints"],
        "outputs_s": seconds["outputs"],
        "iterations": rows,
        "memory_by_phase_MB": _memory_by_phase(memory.series, marks, rows),
        "pid": os.getpid(),
    }


def _memory_by_phase(series, marks: dict, rows: list[dict]) -> dict:
    """Peak anonymous / file-backed MiB in each phase's time window (from the series)."""
    start = marks.get("initialisation_start_s")
    windows = {"reading and preprocessing": (0.0, start if start is not None else 1e18)}
    online = [r for r in rows if r["phase"] == "online"]
    full = [r for r in rows if r["phase"] == "full"]
    if online and start is not None:
        windows["online iterations"] = (start, online[-1]["ended_at_s"])
    if full and online:
        windows["full iterations"] = (online[-1]["ended_at_s"], full[-1]["ended_at_s"])
    out = {}
    for name, (a, b) in windows.items():
        inside = [s for s in series if a <= s[0] <= b]
        if inside:
            out[name] = {
                "anonymous": max(s[1] for s in inside),
                "file_backed": max(s[2] for s in inside),
            }
    return out
