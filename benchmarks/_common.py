"""Helpers shared by the benchmark scripts (run by hand, not part of the test suite)."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_CLASS2D_SHARED_DATA", REPO.parent / "shared" / "data"))

#: benchmark data sets: map file under shared/data/maps (None: the simulator's built-in map
#: of that name), the map's voxel size when its header has none, and the simulation pixel
#: size and box
MAPS = {
    "phantom": {"file": None, "map_apix": None, "apix": 3.0, "box": 96},
    # a ~50 kDa membrane protein with a nanobody in a detergent micelle, ~100 Å across
    "micelle": {"file": None, "map_apix": None, "apix": 1.3, "box": 96},
    "betagal": {
        "file": "relion_betagal_ref_model_100px_3.54A.mrc",
        "map_apix": None,
        "apix": 3.54,
        "box": 96,
    },
    # ASPIRE's 70S ribosome has voxel size 0 in its header; 5 Å makes it ~260 Å across
    "ribosome": {
        "file": "aspire_clean70SRibosome_vol_65p.mrc",
        "map_apix": 5.0,
        "apix": 4.0,
        "box": 96,
    },
}


def map_path(name: str) -> Path | str:
    """The ``map_path`` to simulate ``name``: a file, or the name of a built-in map."""
    entry = MAPS[name]
    if entry["file"] is None:
        return name
    path = SHARED_DATA / "maps" / entry["file"]
    if not path.is_file():
        sys.exit(
            f"map {path} not found (set NAPARI_CLASS2D_SHARED_DATA to the shared data folder)"
        )
    return path


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


def children_cpu_s() -> float:
    """User and system CPU time of this process's finished children, s."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, MiB (Linux).

    ``ru_maxrss`` counts the pages of memory-mapped files as resident while the kernel
    keeps them cached, although they are clean and reclaimable; ``RssAnon`` (heap,
    tensors, arrays) is the memory a job really needs. The kernel reports no peak of
    it, so a background thread samples ``/proc/self/status`` every ``interval_s``.
    Use as a context manager; ``peak_anon_MB`` and ``peak_file_MB`` after it exits.
    """

    def __init__(self, interval_s: float = 0.1, series_every_s: float | None = None):
        self.interval_s = interval_s
        self.peak_anon_MB = 0.0
        self.peak_file_MB = 0.0
        #: with ``series_every_s``: ``(seconds since start, anonymous MiB, file-backed MiB)``
        #: every ``series_every_s`` (the peaks in between, so no spike is missed)
        self.series: list[tuple[float, float, float]] = []
        self.series_every_s = series_every_s
        self._window = [0.0, 0.0]
        self._last = 0.0
        self._start = 0.0
        self._stop = None
        self._thread = None

    @staticmethod
    def current() -> dict[str, float]:
        """``{"RssAnon": MiB, "RssFile": MiB, ...}`` of this process now."""
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Rss"):
                    key, value = line.split(":", 1)
                    out[key] = float(value.split()[0]) / 1024.0  # kB -> MiB
        return out

    def _sample(self) -> None:
        import time

        now = self.current()
        anon, file = now.get("RssAnon", 0.0), now.get("RssFile", 0.0)
        self.peak_anon_MB = max(self.peak_anon_MB, anon)
        self.peak_file_MB = max(self.peak_file_MB, file)
        if self.series_every_s is None:
            return
        self._window = [max(self._window[0], anon), max(self._window[1], file)]
        t = time.monotonic() - self._start
        if not self.series or t - self._last >= self.series_every_s:
            self.series.append((round(t, 2), round(self._window[0], 1), round(self._window[1], 1)))
            self._window, self._last = [0.0, 0.0], t

    def __enter__(self) -> MemorySampler:
        import threading
        import time

        self._stop = threading.Event()
        self._start = time.monotonic()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self._sample()

        self._sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def score_summary(score: dict) -> dict:
    """The headline figures of a :func:`~napari_class2d.sim.score.score_classification`
    result, as every benchmark reports them."""
    return {
        "views_recovered": f"{score['views_recovered']}/{score['n_views']}",
        "rare_views_recovered": f"{score['rare_views_recovered']}/{score['n_rare_views']}",
        "purity": round(score["purity"], 3),
        "junk_in_recovered_classes": round(score["junk_in_recovered_classes"], 3),
        "junk_share_of_recovered_classes": round(score["junk_share_of_recovered_classes"], 4),
        "non_aggregate_junk_in_recovered_classes": round(
            score["non_aggregate_junk_in_recovered_classes"], 3
        ),
        "aggregates_in_recovered_classes": round(
            score["junk_by_kind"].get("aggregate", {}).get("in_recovered_classes", 0.0), 3
        ),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def simulate_in_child(out_dir: Path, **kwargs) -> dict:
    """Simulate in a separate process, so this process's peak memory is the classifier's."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_simulate, str(out_dir), kwargs).result()


def _simulate(out_dir: str, kwargs: dict) -> dict:
    from napari_class2d.sim.simulate import simulate_dataset

    res = simulate_dataset(out_dir, **kwargs)
    return {"seconds": res.seconds, "particles_star": str(res.particles_star)}


def _config_fields() -> set[str]:
    from dataclasses import fields

    from napari_class2d.engine.config import Class2DConfig

    return {f.name for f in fields(Class2DConfig)}


def _override_item(item: str) -> str:
    """argparse type of one ``--set`` item: ``KEY=VALUE`` with KEY a Class2DConfig field."""
    import argparse

    key, sep, _ = item.partition("=")
    known = _config_fields()
    if not sep or key not in known:
        raise argparse.ArgumentTypeError(
            f"{item!r}: expected KEY=VALUE with KEY one of Class2DConfig's fields "
            f"({', '.join(sorted(known))})"
        )
    return item


def add_set_argument(parser, help: str = "Class2DConfig overrides") -> None:
    """The ``--set KEY=VALUE ...`` option every benchmark takes; a wrong item is refused
    when the arguments are parsed (before any simulation or job). Read it with
    :func:`parse_overrides`."""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        type=_override_item,
        metavar="KEY=VALUE",
        help=f"{help}, e.g. --set seed=1 shift_prior=uniform (values parsed as JSON)",
    )


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings to a dict of Class2DConfig overrides (values parsed as JSON,
    else kept as strings)."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def image_key(names):
    """``index@stack-file-name`` of a pandas Series of RELION image names (folders
    dropped), to match the rows of two STAR files that name the same images."""
    return names.str.split("@").str[0].astype(int).astype(str) + "@" + names.str.split("/").str[-1]
