"""``napari-class2d info``: one JSON object on stdout, or a clear error and exit code 2."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest

from io_fixtures import make_relion31, relion31_blocks, write_stack, write_star
from napari_class2d.cli import COMMANDS, info

#: runs only the info command in a fresh interpreter (real stdout/stderr/exit code)
_RUN_INFO = (
    "import argparse, sys; from napari_class2d.cli import info; "
    "p = argparse.ArgumentParser(); info.add_args(p); "
    "sys.exit(info.main(p.parse_args(sys.argv[1:])))"
)


def run_info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _RUN_INFO, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def call_info(capsys, *args: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    info.add_args(parser)
    rc = info.main(parser.parse_args([str(a) for a in args]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_relion31(tmp_path):
    star, _, _ = make_relion31(tmp_path, n=6, box=16)
    result = run_info(star)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    report = json.loads(lines[0])
    assert report["n_particles"] == 6
    assert report["box"] == 16
    assert report["pixel_size_A"] == {"1": 1.5}
    assert report["has_ctf"] is True
    assert report["source_format"] == "relion3.1"
    assert "note" not in report


def test_info_optics_groups_and_pixel_size_dict(tmp_path, capsys):
    write_stack(tmp_path / "stack.mrcs", 4, 16)
    star = write_star(
        tmp_path / "p.star", relion31_blocks(4, groups=(1, 3), pixel_sizes=(1.1, 2.2))
    )
    rc, out, _ = call_info(capsys, star)
    assert rc == 0
    assert json.loads(out)["pixel_size_A"] == {"1": 1.1, "3": 2.2}


def test_info_bare_stack_notes_that_ctf_is_off(tmp_path, capsys):
    write_stack(tmp_path / "s.mrcs", 3, 8, voxel_size=0.0)
    rc, out, err = call_info(capsys, tmp_path / "s.mrcs")
    assert rc == 2 and out == ""
    assert "s.mrcs" in err and "pixel size" in err
    rc, out, _ = call_info(capsys, tmp_path / "s.mrcs", "--pixel-size", "1.7")
    report = json.loads(out)
    assert rc == 0
    assert report["has_ctf"] is False and report["source_format"] == "mrcs"
    assert report["pixel_size_A"] == {"1": 1.7}
    assert "CTF correction will be off" in report["note"]


def test_info_errors_name_the_file_and_exit_2(tmp_path):
    blocks = relion31_blocks(4)
    star = write_star(tmp_path / "p.star", blocks)  # its stack does not exist
    result = run_info(star)
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(star) in result.stderr and "stack.mrcs" in result.stderr
    assert "row 0" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_info(tmp_path / "absent.star")
    assert result.returncode == 2 and "absent.star" in result.stderr


def test_info_project_dir(tmp_path, capsys):
    project = tmp_path / "proj"
    (project / "Extract").mkdir(parents=True)
    write_stack(project / "Extract" / "stack.mrcs", 4, 16)
    star = write_star(tmp_path / "p.star", relion31_blocks(4, stack="Extract/stack.mrcs"))
    rc, _, _ = call_info(capsys, star)
    assert rc == 2
    rc, out, _ = call_info(capsys, star, "--project-dir", project)
    assert rc == 0 and json.loads(out)["n_particles"] == 4


def test_info_on_real_files(shared_data, capsys):
    rc, out, _ = call_info(capsys, shared_data / "real_particles/cryodrgn_relion31/relion31.star")
    assert rc == 0
    report = json.loads(out)
    assert (report["n_particles"], report["box"], report["pixel_size_A"]) == (5, 256, {"1": 2.806})
    cs = shared_data / "cryosparc_cs/cryosparc_J2_particles_exported.cs"
    rc, out, err = call_info(capsys, cs)
    assert rc == 2 and out == "" and str(cs) in err and "not found" in err


@pytest.mark.skipif(
    not all(importlib.util.find_spec(module) for module, _ in COMMANDS.values()),
    reason="other CLI commands not written yet (the dispatcher imports them all)",
)
def test_info_through_the_installed_entry_point(tmp_path):
    star, _, _ = make_relion31(tmp_path, n=6, box=16)
    result = subprocess.run(
        [sys.executable, "-m", "napari_class2d", "info", str(star)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_particles"] == 6
