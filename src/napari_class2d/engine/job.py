"""The classification job: batch and streaming share one schedule.

A batch job is a stream whose particles are all there at the start and whose
"finish" is requested at once, so given the same particles and seed both give
the same classes. The schedule (see ``docs/algorithm.md`` and ``docs/parameters.md``):

* warm-up: start once ``config.warmup_particles`` particles are there (batch: at once);
* online EM: online iteration ``j`` (annealing factor ``config.annealing_factor(j)``)
  runs once ``(j + 1) * batch`` distinct particles have arrived, or once finish is
  requested; each draws its mini-batch from the particles seen so far, unseen ones
  first. While a stream waits for particles it keeps iterating on its pool at the
  current annealing level (the schedule does not advance);
* streaming after the online phase: a full (or incremental) iteration each time
  ``config.full_iteration_trigger`` new particles have arrived;
* finish: the online iterations not yet reached, then ``n_final_full_iterations``
  full iterations (the last one hard when ``hard_classification_last``).

Under ``torchrun`` every process runs this schedule with the same random draws;
each holds and searches its own particles, the statistics are summed over the
processes, the processes agree on stop/finish before every step, rank 0 polls a
stream and hands new particles to the others, and only rank 0 writes outputs and
checkpoints (:mod:`napari_class2d.engine.distributed`, ``docs/distributed.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_class2d.engine import checkpoint, distributed
from napari_class2d.engine.checkpoint import CheckpointError
from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.engine.fourier import fourier_pad
from napari_class2d.engine.lineage import LINEAGE_FILE, ClassLineage
from napari_class2d.engine.model import (
    FULL_STEP_SIZE,
    ONLINE_STEP_SIZE,
    Class2DModel,
    IterationStats,
    ParticleAssignments,
    resolve_device,
)
from napari_class2d.engine.pool import ParticlePool, working_grid
from napari_class2d.engine.snapshot import IterationSnapshot
from napari_class2d.io.errors import DiskFullError, free_bytes
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.source import ParticleSource, as_source
from napari_class2d.io.star import read_star
from napari_class2d.io.writers import (
    write_class_averages,
    write_model_star,
    write_particle_star,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: the job's own counters, kept in the checkpoint
COUNTERS = (
    "online_done",
    "full_done",
    "iteration",
    "n_at_last_update",
    "incremental_updates",
    "done",
)
#: bytes per kept Fourier coefficient and particle in the cache (float16 real, imaginary, CTF)
CACHE_BYTES_PER_COEFFICIENT = 6
#: room kept free beside the cache (checkpoint, outputs), bytes
CACHE_MARGIN_BYTES = 64 * 2**20
#: idle iterations on an unchanged pool before a stream only waits
MAX_IDLE_ITERATIONS = 2


class Class2DJob:
    """A 2D classification job over a particle set (batch) or a particle stream.

    Parameters
    ----------
    particles_or_source
        A :class:`~napari_class2d.io.particles.ParticleSet` (batch) or a
        :class:`~napari_class2d.io.source.ParticleSource`: a fixed set
        (``streaming`` false) or a stream that grows
        (:class:`~napari_class2d.stream.watcher.FolderWatcher`).
    config
        Job parameters; validated before any work starts.
    out_dir
        Folder for outputs, the particle cache and the checkpoint (``None``: no files).
    resume
        Continue from ``out_dir/checkpoint.pt`` (the source must hold the same
        particles as when the job started).
    overwrite
        Replace existing outputs in ``out_dir`` (otherwise refuse to start over them).
    poll_seconds
        Streaming: pause between polls while waiting for particles.
    on_first_particles
        Called with the first particles and the config before anything is
        computed; returns the config to use (e.g. CTF correction off for
        particles without CTF). ``None``: the config as given.
    reducer
        The processes the job runs over (:mod:`napari_class2d.engine.distributed`);
        ``None``: the process group ``torchrun`` started this process in, joined
        here, or this process alone.

    Attributes
    ----------
    seconds
        Wall time spent so far outside the iterations, per kind: ``preprocessing``
        (reading and caching particles), ``initialisation``, ``checkpoints``,
        ``outputs`` (RELION files).

    Raises
    ------
    ConfigError
        An invalid parameter, or a device that is not there.
    FileExistsError
        ``out_dir`` holds a result and neither ``resume`` nor ``overwrite`` is set.
    CheckpointError, SourceMismatchError
        ``resume`` with a checkpoint this version cannot read, or other particles.
    DistributedError
        Started by ``torchrun`` and the other processes cannot be reached.
    """

    def __init__(
        self,
        particles_or_source: ParticleSet | ParticleSource,
        config: Class2DConfig,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        poll_seconds: float = 2.0,
        on_first_particles: Callable[[ParticleSet, Class2DConfig], Class2DConfig] | None = None,
        reducer: distributed.Reducer | None = None,
    ):
        self.config = config.validate()
        self.source = as_source(particles_or_source)
        self.streaming = self.source.streaming
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.overwrite = overwrite
        self.poll_seconds = poll_seconds
        self.on_first_particles = on_first_particles
        try:
            self.device = resolve_device(distributed.rank_device(config.device))
        except (ValueError, RuntimeError) as err:
            text = str(err)
            raise ConfigError(
                text if text.startswith("device=") else f"device={config.device!r}: {text}"
            ) from None
        self.reducer = (
            reducer if reducer is not None else distributed.from_environment(config.device)
        )
        self.seconds = dict.fromkeys(
            ("preprocessing", "initialisation", "checkpoints", "outputs"), 0.0
        )
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._finishing = False  # finish, as all processes agreed before this step
        if not self.streaming:
            self._finish.set()
        self.pool: ParticlePool | None = None
        self.model: Class2DModel | None = None
        self.assignments = ParticleAssignments.empty()
        self.rng = np.random.default_rng(config.seed)
        self.seen = np.zeros(0, dtype=bool)
        self.online_done = 0
        self.full_done = 0
        self.iteration = 0
        self.idle_iterations = 0
        self.n_at_last_update = 0
        self.incremental_updates = 0
        self.history: list[dict] = []
        #: which class is which over the updates, by shared particles (engine/lineage.py)
        self.lineage = ClassLineage(self.config.n_classes)
        self.done = False
        self._first_batch: np.ndarray | None = None  # the mini-batch the references came from
        self._last_snapshot: IterationSnapshot | None = None
        self._block_tables: list[str | None] = []  # per pool block: its saved particle table
        if self.out_dir is not None:
            existing = [p for p in ("run_data.star", CHECKPOINT) if (self.out_dir / p).exists()]
            if existing and not (resume or overwrite):
                raise FileExistsError(
                    f"{self.out_dir} already holds {', '.join(existing)}: "
                    "resume the job or allow overwriting"
                )
            if resume:
                self._load_checkpoint()

    # -- control (thread-safe) ---------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current iteration; the checkpoint keeps everything computed."""
        self._stop.set()

    def request_finish(self) -> None:
        """Streaming: finish the schedule (remaining online, final full iterations)."""
        self._finish.set()

    @property
    def n_particles(self) -> int:
        return self.pool.n if self.pool is not None else 0

    @property
    def n_iterations_planned(self) -> int:
        return self.config.n_online_em_iterations + self.config.n_final_full_iterations

    # -- the schedule ------------------------------------------------------------------
    def run(self) -> Iterator[IterationSnapshot]:
        """Run the schedule, yielding one snapshot per iteration (and while waiting)."""
        cfg = self.config
        batch = cfg.online_batch_size
        while not self.done:
            # distributed: every process takes the same step (any one's request counts)
            stop, finishing = self.reducer.any(self._stop.is_set(), self._finish.is_set())
            if stop:
                self.save_checkpoint()
                return
            if finishing:
                self._finish.set()
            self._finishing = finishing
            arrived = self._poll() if self.streaming or self.pool is None else 0
            if arrived:
                self.idle_iterations = 0
            n = self.n_particles
            if self.model is None or not self.model.initialised:
                if n >= cfg.warmup_particles or (finishing and n > 0):
                    self._initialise()
                elif finishing:
                    raise ValueError("the job was finished before any particle arrived")
                else:
                    yield self._waiting(
                        f"waiting for particles: {n} of {cfg.warmup_particles} needed to start"
                    )
                    continue
            if self.online_done < cfg.n_online_em_iterations:
                if finishing or n >= (self.online_done + 1) * batch:
                    yield self._online(advance=True)
                elif self.idle_iterations < MAX_IDLE_ITERATIONS:
                    self.idle_iterations += 1
                    yield self._online(advance=False)
                else:
                    need = (self.online_done + 1) * batch
                    yield self._waiting(
                        f"online iteration {self.online_done + 1} waits for "
                        f"{need} distinct particles ({n} so far)"
                    )
                continue
            if not finishing:
                if n - self.n_at_last_update >= cfg.full_iteration_trigger:
                    yield self._streaming_update()
                else:
                    nxt = self.n_at_last_update + cfg.full_iteration_trigger
                    yield self._waiting(
                        f"online phase done; next full iteration at {nxt} particles ({n} so far)",
                        next_full_at=nxt,
                    )
                continue
            if self.full_done < cfg.n_final_full_iterations:
                last = self.full_done == cfg.n_final_full_iterations - 1
                yield self._full(hard=last and cfg.hard_classification_last, final=True)
                continue
            self.done = True
            self.save_checkpoint()
            if self.out_dir is not None and self.reducer.is_main:  # distributed: rank 0
                self._write_outputs_timed()

    def run_to_end(self) -> IterationSnapshot | None:
        """Consume :meth:`run`; return the last snapshot."""
        for snap in self.run():
            self._last_snapshot = snap
        return self._last_snapshot

    # -- steps -------------------------------------------------------------------------
    def _poll(self) -> int:
        if self.streaming and self.reducer.world_size > 1:
            # distributed: rank 0 watches the stream and hands what arrived to the others
            new = self.reducer.broadcast_object(
                self.source.poll() if self.reducer.is_main else None
            )
        else:
            new = self.source.poll()
        if new is None or new.n_particles == 0:
            if self._last_snapshot is not None and self._last_snapshot.phase == "waiting":
                time.sleep(self.poll_seconds)
            return 0
        self._add(new)
        return new.n_particles

    def _add(self, particles: ParticleSet) -> None:
        if self.pool is None:
            if self.on_first_particles is not None:
                self.config = self.on_first_particles(particles, self.config).validate()
            apix = float(np.median(particles.pixel_size_A))
            params = self.config.resolve(particles.box, apix)
            for note in params.notes:
                log.info(note)
            if self.config.ctf_correction != "off" and not particles.has_ctf:
                where = particles.source_path or "the particles"
                raise ConfigError(
                    f"ctf_correction={self.config.ctf_correction!r}: {where} "
                    "carry no CTF parameters; use ctf_correction='off'"
                )
            cache = self.out_dir / "cache" if self.out_dir is not None else None
            self.pool = ParticlePool(
                params,
                working_grid(params),
                cache,
                seed=self.config.seed,
                shard=self.reducer.shard,
                device=self.device,
            )
            self.model = Class2DModel(self.config, params, self.device)
            self.model.reducer = self.reducer
        elif self.config.ctf_correction != "off" and not particles.has_ctf:
            raise ConfigError(f"{particles.source_path}: new particles carry no CTF parameters")
        self._check_space(particles.n_particles)
        t0 = time.perf_counter()
        self.pool.add(particles)
        self.seconds["preprocessing"] += time.perf_counter() - t0
        self._block_tables.append(self._save_block_table(particles))
        self.seen = np.concatenate([self.seen, np.zeros(particles.n_particles, bool)])
        self.assignments.grow(self.pool.n)

    def _check_space(self, n: int) -> None:
        """Refuse to grow the memory-mapped cache onto a disk without room for it (a full
        disk under a memory map kills the process with SIGBUS, without a message)."""
        if self.pool is None or self.pool.cache_dir is None:
            return
        # distributed: the processes of this node share its disk, each with its share
        r = self.reducer
        n = -(-n * r.local_world_size // r.world_size)
        needed = n * self.pool.grid.n * CACHE_BYTES_PER_COEFFICIENT + CACHE_MARGIN_BYTES
        free = free_bytes(self.pool.cache_dir)
        if free is not None and free < needed:
            raise DiskFullError(
                self.pool.cache_dir, needed, free, what=f"the cache of {n} particles"
            )

    def _save_block_table(self, particles: ParticleSet) -> str | None:
        """Streaming with files: keep the particles of a pool block as a STAR file in the
        cache, so a resumed job has them (a fixed set is given again instead)."""
        if not self.streaming or self.pool is None or self.pool.cache_dir is None:
            return None
        name = f"particles_{len(self._block_tables):05d}.star"
        if self.reducer.is_main:  # distributed: one process writes, all may read it back
            (self.out_dir / "cache").mkdir(parents=True, exist_ok=True)
            write_particle_star(self.out_dir / "cache" / name, particles, overwrite=True)
        return f"cache/{name}"

    def _draw(self, size: int) -> np.ndarray:
        """A mini-batch: unseen particles first, the rest at random from those seen."""
        n = self.n_particles
        unseen = np.nonzero(~self.seen[:n])[0]
        if len(unseen) >= size:
            pick = self.rng.choice(unseen, size, replace=False)
        else:
            seen = np.nonzero(self.seen[:n])[0]
            extra = self.rng.choice(seen, min(size - len(unseen), len(seen)), replace=False)
            pick = np.concatenate([unseen, extra])
        self.seen[pick] = True
        return np.sort(pick)

    def _initialise(self) -> None:
        t0 = time.perf_counter()
        self._first_batch = self._draw(self.config.online_batch_size)
        self.model.initialise(self.pool, self._first_batch, self.rng)
        self.seconds["initialisation"] += time.perf_counter() - t0

    def _online(self, advance: bool) -> IterationSnapshot:
        cfg = self.config
        j = self.online_done
        indices, self._first_batch = self._first_batch, None
        if indices is None:
            indices = self._draw(cfg.online_batch_size)
        anneal = cfg.annealing_factor(j)
        last_overall = (
            advance
            and j == cfg.n_online_em_iterations - 1
            and cfg.n_final_full_iterations == 0
            and self._finishing
        )
        step = 1.0 if (j == 0 and advance and self.iteration == 0) else ONLINE_STEP_SIZE
        stats = self.model.iterate(
            self.pool,
            indices,
            self.assignments,
            anneal,
            step,
            hard=last_overall and cfg.hard_classification_last,
            online=True,
            rng=self.rng,
        )
        if advance:
            self.online_done += 1
        msg = "" if advance else "iterating on the pool while waiting for particles"
        return self._after("online", stats, anneal, msg)

    def _full(self, hard: bool, final: bool) -> IterationSnapshot:
        indices = np.arange(self.n_particles)
        self.seen[:] = True
        stats = self.model.iterate(
            self.pool,
            indices,
            self.assignments,
            1.0,
            FULL_STEP_SIZE,
            hard=hard,
            online=False,
            rng=self.rng,
            final=final,
        )
        if final:
            self.full_done += 1
        self.n_at_last_update = self.n_particles
        return self._after("full", stats, 1.0, "")

    def _streaming_update(self) -> IterationSnapshot:
        cfg = self.config
        if (
            cfg.stream_mode == "full"
            or self.incremental_updates + 1 >= cfg.full_pass_every_n_updates
        ):
            self.incremental_updates = 0
            return self._full(hard=False, final=False)
        # incremental: E-step on the new particles only, their statistics added on
        new = np.arange(self.n_at_last_update, self.n_particles)
        self.seen[new] = True
        frac = len(new) / max(self.n_particles, 1)
        stats = self.model.iterate(
            self.pool,
            new,
            self.assignments,
            1.0,
            frac,
            hard=False,
            online=False,
            rng=self.rng,
            rescale=False,
        )
        self.incremental_updates += 1
        self.n_at_last_update = self.n_particles
        return self._after("incremental", stats, 1.0, "")

    # -- snapshots ---------------------------------------------------------------------
    def _after(
        self, phase: str, stats: IterationStats, anneal: float, msg: str
    ) -> IterationSnapshot:
        self.iteration += 1
        self.lineage.update(
            self.iteration,
            phase,
            self.assignments.best_class,
            self.model.resolution.cpu().numpy(),
        )
        snap = self._snapshot(phase, stats, anneal, msg)
        self.history.append(
            {
                "iteration": self.iteration,
                "phase": phase,
                "counts": stats.counts_hard.tolist(),
                "resolution_A": snap.class_resolution_A.tolist(),
                "annealing_factor": anneal,
            }
        )
        self._last_snapshot = snap
        if self.out_dir is not None:
            self.save_checkpoint()
            if self.reducer.is_main:  # distributed: rank 0 writes the RELION files
                self._write_outputs_timed()
        return snap

    def _write_outputs_timed(self) -> None:
        t0 = time.perf_counter()
        self.write_outputs(self.out_dir, overwrite=True)
        self.seconds["outputs"] += time.perf_counter() - t0

    def _snapshot(
        self, phase, stats: IterationStats | None, anneal: float, msg: str, next_full_at: int = 0
    ) -> IterationSnapshot:
        cfg = self.config
        m = self.model
        k = cfg.n_classes
        n = self.n_particles
        if m is not None and m.initialised:
            avgs = m.class_averages()
            apix = m.pixel_size_A
            res = m.resolution.cpu().numpy().astype(np.float32)
            dist = m.prior.cpu().numpy().astype(np.float32)
            noise = m.noise.cpu().numpy().astype(np.float32)
            inner, outer = m.params.mask_inner_diameter_A, m.params.mask_outer_diameter_A
        else:
            d = m.params.working_box if m is not None else 1
            avgs = np.zeros((k, d, d), np.float32)
            apix = m.pixel_size_A if m is not None else 1.0
            res = np.full(k, np.inf, np.float32)
            dist = np.full(k, 1.0 / k, np.float32)
            noise = np.zeros(1, np.float32)
            inner = m.params.mask_inner_diameter_A if m is not None else 0.0
            outer = m.params.mask_outer_diameter_A if m is not None else 0.0
        if stats is None and self._last_snapshot is not None and phase == "waiting":
            prev = self._last_snapshot
            hard, soft, eca = prev.class_counts_hard, prev.class_counts_soft, prev.class_eca
        elif stats is None:
            hard = np.zeros(k, np.int64)
            soft = np.zeros(k, np.float32)
            eca = np.zeros(k, np.float32)
        else:
            hard, soft, eca = stats.counts_hard, stats.counts_soft, stats.eca
        needed = max(0, cfg.warmup_particles - n) if (m is None or not m.initialised) else 0
        return IterationSnapshot(
            iteration=self.iteration,
            n_iterations_planned=self.n_iterations_planned,
            phase=phase,
            class_averages=avgs,
            pixel_size_A=float(apix),
            class_counts_hard=np.asarray(hard, np.int64),
            class_counts_soft=np.asarray(soft, np.float32),
            class_resolution_A=res,
            class_eca=np.asarray(eca, np.float32),
            class_distribution=dist,
            noise_spectrum=noise,
            annealing_factor=float(anneal),
            n_particles_seen=n,
            n_particles_used=stats.n_particles if stats is not None else 0,
            mask_inner_diameter_A=float(inner),
            mask_outer_diameter_A=float(outer),
            n_particles_needed=needed,
            next_full_at=next_full_at,
            timings=dict(stats.timings, n_evaluations=stats.n_evaluations) if stats else {},
            message=msg,
            class_lineage_id=self.lineage.lineage_ids(),
            class_flags=tuple(self.lineage.class_flags()),
        )

    def _waiting(self, msg: str, next_full_at: int = 0) -> IterationSnapshot:
        anneal = self.config.annealing_factor(self.online_done)
        snap = self._snapshot("waiting", None, anneal, msg, next_full_at)
        self._last_snapshot = snap
        return snap

    # -- outputs -----------------------------------------------------------------------
    def particles(self) -> ParticleSet:
        """All particles of the job, in pool order."""
        sets = self.pool.sets
        return sets[0] if len(sets) == 1 else ParticleSet.concat(sets)

    def particle_table(self) -> pd.DataFrame:
        """Classification columns per particle (RELION names, 1-based classes)."""
        a = self.assignments
        apix = self.model.pixel_size_A
        visited = a.best_class >= 0
        return pd.DataFrame(
            {
                "rlnClassNumber": np.where(visited, a.best_class + 1, 0).astype(int),
                # engine: particle = class turned by +psi with y along rows; RELION's psi turns
                # the other way in that frame (docs/simulation.md, checked against its projector)
                "rlnAnglePsi": np.mod(-a.psi_deg, 360.0),
                "rlnOriginXAngst": -a.shift_px[:, 0] * apix,
                "rlnOriginYAngst": -a.shift_px[:, 1] * apix,
                "rlnMaxValueProbDistribution": a.max_prob,
                "rlnNrOfSignificantSamples": np.maximum(np.round(a.ess_pose), 1).astype(int),
                "rlnLogLikeliContribution": a.loglik,
            }
        )

    def write_outputs(self, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write ``run_data.star``, ``run_classes.mrcs`` and ``run_model.star`` atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        m = self.model
        paths = {
            "data": out / "run_data.star",
            "classes": out / "run_classes.mrcs",
            "model": out / "run_model.star",
            "lineage": out / LINEAGE_FILE,
        }
        # at the particles' box and pixel size, as RELION writes classes (so RELION takes
        # them as references): the working-box averages with their transform zero-padded
        averages = fourier_pad(torch.from_numpy(m.class_averages()), m.params.box).numpy()
        write_class_averages(
            paths["classes"], averages, m.params.pixel_size_A, overwrite=overwrite
        )
        counts = np.bincount(
            self.assignments.best_class[self.assignments.best_class >= 0],
            minlength=self.config.n_classes,
        )
        dist = counts / max(counts.sum(), 1)
        a = self.assignments
        visited = a.best_class >= 0
        eca = np.bincount(
            a.best_class[visited], weights=a.ess_class[visited], minlength=self.config.n_classes
        ) / np.maximum(counts, 1)
        general = {
            "rlnCurrentIteration": self.iteration,
            "rlnParticleDiameter": m.params.particle_diameter_A,
        }
        if m.params.shift_prior == "gaussian":  # the learned prior's width, as RELION's
            general["rlnSigmaOffsetsAngst"] = math.sqrt(m.sigma2_offset_px) * m.pixel_size_A
        write_model_star(
            paths["model"],
            paths["classes"].name,
            dist,
            m.resolution.cpu().numpy(),
            m.params.pixel_size_A,
            extra_class_columns={"rlnClassECA": eca},
            overwrite=overwrite,
            original_image_size=m.params.box,
            extra_general=general,
        )
        self.lineage.write(paths["lineage"], overwrite=overwrite)
        write_particle_star(
            paths["data"],
            self.particles(),
            extra_columns=self.particle_table(),
            overwrite=overwrite,
        )
        return paths

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoint.pt`` (tensors and a JSON document; see
        :mod:`napari_class2d.engine.checkpoint`). ``None`` when there is nothing to keep,
        and on every process of a distributed job but rank 0."""
        if self.out_dir is None or self.model is None or self.pool is None:
            return None
        if not self.reducer.is_main:  # distributed: rank 0 keeps the checkpoint
            return None
        t0 = time.perf_counter()
        model_doc, tensors = checkpoint.split_state(self.model.state_dict(), "model")
        fields = [f.name for f in dataclasses.fields(ParticleAssignments)]
        for name in fields:
            tensors[f"assignments/{name}"] = np.asarray(getattr(self.assignments, name))
        tensors["seen"] = self.seen
        tensors["half"] = np.asarray(self.pool.half)
        if self._first_batch is not None:
            tensors["first_batch"] = self._first_batch
        document = {
            "config": self.config.to_dict(),
            "model": model_doc,
            "assignments": fields,
            "rng": self.rng.bit_generator.state,
            "counters": {k: getattr(self, k) for k in COUNTERS},
            "history": self.history,
            "lineage": self.lineage.to_dict(),
            "source": self.source.state(),
            "blocks": [
                {"n_particles": s.n_particles, "table": t}
                for s, t in zip(self.pool.sets, self._block_tables, strict=True)
            ],
            "first_batch": self._first_batch is not None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = checkpoint.save(self.out_dir / CHECKPOINT, document, tensors)
        self.seconds["checkpoints"] += time.perf_counter() - t0
        return path

    def _load_checkpoint(self) -> None:
        document, tensors = checkpoint.load(self.out_dir / CHECKPOINT)
        stored = dict(document["config"])
        if "shift_prior" not in stored:  # written before shift_prior was a parameter: the
            # Gaussian prior came only with masks that follow the shifts
            stored["shift_prior"] = "gaussian" if stored.get("masks_follow_shifts") else "uniform"
        stored.setdefault("class_prior", "learned")  # before class_prior: the learned shares
        saved = Class2DConfig.from_dict(stored)
        if saved.replace(device=self.config.device) != self.config.replace(
            device=saved.device, memory_budget_GB=saved.memory_budget_GB
        ):
            log.warning("resuming with changed parameters; the checkpoint's values are used")
            self.config = saved.replace(device=self.config.device)
        self.source.restore(document["source"])
        sets = self.source.redelivered()
        blocks = document["blocks"]
        if sets is None:
            sets = [self._read_block_table(b) for b in blocks]
        if [s.n_particles for s in sets] != [b["n_particles"] for b in blocks]:
            raise CheckpointError(
                f"{self.out_dir / CHECKPOINT}: the particles do not match the checkpoint's "
                f"({[b['n_particles'] for b in blocks]} per block)"
            )
        first = sets[0]
        params = self.config.resolve(first.box, float(np.median(first.pixel_size_A)))
        self.pool = ParticlePool(
            params,
            working_grid(params),
            self.out_dir / "cache",
            seed=self.config.seed,
            shard=self.reducer.shard,
            device=self.device,
        )
        t0 = time.perf_counter()
        rebuilt = self.pool.reopen(sets, tensors["half"].numpy())
        self.seconds["preprocessing"] += time.perf_counter() - t0
        if rebuilt:
            log.info(
                "%d of %d blocks of the particle cache were not there for %d process(es) "
                "and were made again from the particle files",
                rebuilt,
                len(sets),
                self.reducer.world_size,
            )
        self._block_tables = [b["table"] for b in blocks]
        self.model = Class2DModel(self.config, params, self.device)
        self.model.reducer = self.reducer
        self.model.load_state_dict(self._model_state(document["model"], tensors))
        try:
            self.assignments = ParticleAssignments(
                **{
                    name: tensors[f"assignments/{name}"].numpy()
                    for name in document["assignments"]
                }
            )
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.out_dir / CHECKPOINT}: the particle assignments do not fit this version "
                f"of napari-class2d ({err})"
            ) from None
        self.rng.bit_generator.state = document["rng"]
        self.seen = tensors["seen"].numpy()
        for k, v in document["counters"].items():
            setattr(self, k, v)
        self.history = document["history"]
        if "lineage" in document:
            self.lineage = ClassLineage.from_dict(document["lineage"], self.assignments.best_class)
        else:  # a checkpoint from before lineage was kept: follow the classes from here
            self.lineage = ClassLineage(self.config.n_classes)
            self.lineage.labels = self.assignments.best_class.copy()
        self._first_batch = tensors["first_batch"].numpy() if document["first_batch"] else None

    def _model_state(self, described: dict, tensors: dict) -> dict:
        """The checkpoint's model state, checked against what this version's model holds."""
        state = checkpoint.join_state(described, tensors, "model")
        current = self.model.state_dict()
        where = self.out_dir / CHECKPOINT
        if set(state) != set(current) and not (
            set(state) < set(current) and set(current) - set(state) <= Class2DModel.DERIVED_STATE
        ):
            raise CheckpointError(
                f"{where}: the classifier state it holds ({', '.join(sorted(state))}) is not "
                f"this version's ({', '.join(sorted(current))}); start the job again (overwrite)"
            )
        for key, value in current.items():
            shape = getattr(value, "shape", None)
            if key in state and shape is not None and tuple(state[key].shape) != tuple(shape):
                raise CheckpointError(
                    f"{where}: {key} has shape {tuple(state[key].shape)}, this version's "
                    f"{tuple(shape)}; start the job again (overwrite)"
                )
        return state

    def _read_block_table(self, block: dict) -> ParticleSet:
        table = block.get("table")
        if table is None:
            raise CheckpointError(
                f"{self.out_dir / CHECKPOINT}: a block of {block['n_particles']} particles was "
                "not saved with the checkpoint"
            )
        return read_star(self.out_dir / table, check_stacks_exist=False)
