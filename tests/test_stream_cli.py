"""`napari-class2d stream`: end to end on a small stream of files arriving over time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from napari_class2d.cli import main
from napari_class2d.engine.config import Class2DConfig
from napari_class2d.run.spec import SourceOptions, StreamOptions
from test_stream_watcher import BOX, write_micrograph

TINY = [
    "--classes", "3",
    "--batch-per-class", "20",
    "--online-iters", "3",
    "--max-res", "8",
    "--device", "cpu",
    "--poll-seconds", "0.2",
]  # fmt: skip


def feed(
    folder: Path, first: int, n_files: int, per_file: int, pause_s: float
) -> threading.Thread:
    """Write ``n_files`` micrographs into ``folder`` from a thread, ``pause_s`` apart."""

    def run():
        for m in range(first, first + n_files):
            write_micrograph(folder, f"mic{m:03d}", m * per_file, per_file)
            time.sleep(pause_s)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def check_outputs(out: Path, n_particles: int, n_classes: int = 3) -> None:
    data = starfile.read(out / "run_data.star", always_dict=True)
    particles = data["particles"]
    assert "optics" in data
    assert len(particles) == n_particles
    expected = {
        f"{i + 1:06d}@mic{m:03d}.mrcs" for m in range(n_particles // 40) for i in range(40)
    }
    assert set(particles["rlnImageName"].str.replace(r"@.*/", "@", regex=True)) == expected
    classes = particles["rlnClassNumber"].to_numpy()
    assert classes.min() >= 1 and classes.max() <= n_classes  # 1-based, every particle classified
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnMaxValueProbDistribution"):
        assert np.isfinite(particles[column].to_numpy(dtype=float)).all()
    with mrcfile.open(out / "run_classes.mrcs", permissive=True) as mrc:
        assert mrc.data.shape[0] == n_classes and mrc.data.dtype == np.float32
        assert float(mrc.voxel_size.x) > 0
    model = starfile.read(out / "run_model.star", always_dict=True)
    assert len(model["model_classes"]) == n_classes
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_stream_cli_end_to_end(tmp_path, capsys):
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    writer = feed(watch, 0, 6, 40, 0.15)
    try:
        rc = main(["stream", str(watch), "--out", str(out), "--finish-after-idle", "2", *TINY])
    finally:
        writer.join()
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert any("online" in line and "seen" in line for line in lines)
    assert any("no new particles for 2 s: finishing" in line for line in lines)
    assert "Done: 240 particles in 3 classes" in captured.out
    check_outputs(out, 240)


def test_stream_options_reach_the_job_config(tmp_path):
    from napari_class2d.cli import build_parser
    from napari_class2d.cli.stream import spec_from_args

    args = build_parser().parse_args(
        ["stream", str(tmp_path), "--out", str(tmp_path / "o"), "--classes", "7",
         "--start-after", "123", "--full-every", "456", "--mode", "incremental",
         "--full-pass-every", "3", "--max-res", "9", "--ctf", "flip", "--pixel-size", "1.5",
         "--project-dir", str(tmp_path), "--poll-seconds", "0.5", "--stable-seconds", "3",
         "--finish-after-idle", "60", "--marginalize"]
    )  # fmt: skip
    spec = spec_from_args(args)
    config = spec.config
    assert (config.n_classes, config.max_res_A, config.ctf_correction) == (7, 9.0, "flip")
    assert config.warmup_particles == 123 and config.full_iteration_trigger == 456
    assert config.stream_mode == "incremental" and config.full_pass_every_n_updates == 3
    assert not config.force_max_over_poses
    assert (spec.source.pixel_size_A, spec.source.project_dir) == (1.5, str(tmp_path))
    assert (spec.stream.poll_seconds, spec.stream.stable_seconds) == (0.5, 3.0)
    assert spec.stream.finish_after_idle_seconds == 60.0 and spec.streaming
    default = spec_from_args(build_parser().parse_args(["stream", "d", "--out", "o"]))
    assert default.config == Class2DConfig() and default.config.max_res_A is None
    assert default.stream == StreamOptions() and default.source == SourceOptions()


def test_stream_refuses_existing_outputs_without_resume(tmp_path, capsys):
    watch, out = tmp_path / "watch", tmp_path / "out"
    write_micrograph(watch, "mic000", 0, 40)
    out.mkdir()
    (out / "run_data.star").write_text("data_\n")
    rc = main(["stream", str(watch), "--out", str(out), "--finish-after-idle", "1", *TINY])
    assert rc == 2
    assert "--resume" in capsys.readouterr().err


def test_stream_bad_option_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "watch").mkdir()
    rc = main(["stream", str(tmp_path / "watch"), "--out", str(tmp_path / "o"),
               *TINY, "--classes", "0"])  # fmt: skip
    assert rc == 2
    assert "n_classes" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_keeps_checkpoint_and_resume_does_not_reimport(tmp_path):
    watch, out = tmp_path / "watch", tmp_path / "out"
    for m in range(3):
        write_micrograph(watch, f"mic{m:03d}", m * 40, 40)
    cmd = [sys.executable, "-m", "napari_class2d", "stream", str(watch), "--out", str(out), *TINY]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "online" in line and "seen 120" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "stopping after the current iteration" in output
    assert "--resume" in output
    assert (out / "checkpoint.pt").is_file() and (out / "run_data.star").is_file()

    # more files arrive while the job is down; the resumed job takes only those
    for m in range(3, 5):
        write_micrograph(watch, f"mic{m:03d}", m * 40, 40)
    rc = main(["stream", str(watch), "--out", str(out), "--resume",
               "--finish-after-idle", "1", *TINY])  # fmt: skip
    assert rc == 0
    check_outputs(out, 200)
    assert BOX == 32


def test_a_new_config_field_gets_a_flag_without_code(monkeypatch):
    """Flags are generated from the dataclass: a field the engine adds is on the command line."""
    import dataclasses

    from napari_class2d.cli import _options

    extended = dataclasses.make_dataclass(
        "Class2DConfig",
        [("noise_floor_A", float | None, dataclasses.field(default=None))],
        bases=(Class2DConfig,),
        frozen=True,
    )
    extended.__doc__ = Class2DConfig.__doc__.replace(
        "    Attributes\n    ----------\n",
        "    Attributes\n    ----------\n    noise_floor_A\n        A new parameter in Å.\n",
    )
    monkeypatch.setattr(_options, "Class2DConfig", extended)
    from napari_class2d.cli import build_parser

    args = build_parser().parse_args(["classify", "p.star", "--out", "o", "--noise-floor", "7"])
    config = _options.config_from_args(args)
    assert config.noise_floor_A == 7.0 and config.n_classes == Class2DConfig().n_classes
