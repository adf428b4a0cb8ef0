"""``benchmarks/gpu.py`` runs where no GPU is lent: the same script on the CPU, with one
and with two gloo processes, on a few hundred particles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import napari_class2d

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_with_one_and_two_processes(tmp_path):
    src = str(Path(napari_class2d.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu",
           "--n", "500", "--base-n", "200", "--classes", "4", "--nproc", "1", "2",
           "--out", str(tmp_path), "--set", "n_online_em_iterations=2",
           "batch_size_per_class=20", "max_res_A=15"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "speed-up" in run.stdout  # the table
    result = json.loads((tmp_path / "gpu.json").read_text())
    one, two = result["runs"]
    assert (one["nproc"], two["nproc"]) == (1, 2)
    for r in (one, two):
        assert r["complete"] and r["n_particles"] == 500
        assert sum(r["particles_held_per_process"]) == 500  # each particle held once
        assert r["online_s"] > 0 and r["full_s"] > 0 and r["full_particles_per_s"] > 0
    assert len(two["particles_held_per_process"]) == 2
    assert two["speed_up_iterations"] > 0
