"""Class ranking, auto-selection and the rare-view guard; ``select --auto`` on a finished job."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import starfile

from _selection_data import make_ranked_result, make_result
from napari_class2d.cli import build_parser
from napari_class2d.cli import select as select_cli
from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.job import Class2DJob
from napari_class2d.ranking import (
    DEFAULT_THRESHOLD,
    GUARD_MARK,
    apply_user_choice,
    auto_select,
    class_features,
    mask_diameter_from_averages,
    particle_diameter,
    roundness,
)
from napari_class2d.selection import load_result
from synthetic import make_particles


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranked")
    truth = make_ranked_result(folder)
    result = load_result(folder)
    return result, class_features(result), truth, folder


def test_features_read_the_job_and_the_averages(ranked):
    result, f, truth, _ = ranked
    assert result.particle_diameter_A == 120.0 and f.particle_diameter_A == 120.0
    np.testing.assert_array_equal(f.count, truth["counts"])
    assert f.blank[truth["empty"] - 1] and not f.blank[:8].any()
    # the noise class fills its mask; the views do not
    assert f.outer_energy_fraction[6] > 0.25 > f.outer_energy_fraction[:6].max()
    # two classes of one view match each other best, nearly perfectly
    assert f.most_similar[0] == 2 and f.most_similar[1] == 1 and f.similarity[0] > 0.95
    assert f.similarity[5] < f.similarity[0]  # the rare view is like no other class
    assert f.lineage_flag[truth["empty"] - 1] == "emptied it 6 → 1"


def test_auto_selection_keeps_views_and_the_rare_view_rejects_junk(ranked):
    result, f, truth, _ = ranked
    auto = auto_select(result, features=f)
    kept = set(auto.kept_classes().tolist())
    assert {1, 2, 3, 4, 5, truth["rare"]} == kept
    # the rare view scores below the threshold on its size, and the guard keeps it
    rare = truth["rare"] - 1
    assert auto.score[rare] < DEFAULT_THRESHOLD <= auto.quality[rare]
    assert auto.guarded[rare] and auto.reasons[rare].startswith(GUARD_MARK)
    assert auto.guarded.sum() == 1
    assert "noise texture" in auto.reasons[6] and "resolution" in auto.reasons[7]
    assert auto.reasons[8] == "empty"
    # without the guard it is rejected
    plain = auto_select(result, features=f, guard=False)
    assert truth["rare"] not in plain.kept_classes()


def test_threshold_moves_the_selection_and_the_user_wins(ranked):
    result, f, truth, _ = ranked
    auto = auto_select(result, features=f)
    strict = auto.at_threshold(0.95)
    lenient = auto.at_threshold(0.01)
    assert set(strict.kept_classes()) < set(auto.kept_classes()) <= set(lenient.kept_classes())
    for t in (0.2, 0.5, 0.8):  # the guard keeps the rare view at any threshold
        assert auto.at_threshold(t).keep[truth["rare"] - 1]
    keep = apply_user_choice(auto, {7: True, 1: False})
    assert keep[6] and not keep[0] and keep[1]


def test_particle_diameter_without_the_jobs_record(ranked):
    result, _, _, _ = ranked
    # the engine masks its averages: the mask's outer edge is 1.2 x the diameter
    avg = result.class_averages.copy()
    c = np.arange(32) - 16
    avg[:, np.hypot(c[:, None], c[None, :]) * 5.0 > 72.0] = 0.0
    assert mask_diameter_from_averages(avg, 5.0) == pytest.approx(150.0, abs=10.0)
    no_record = type(result)(**{**result.__dict__, "particle_diameter_A": None})
    assert particle_diameter(no_record) > 0
    r = roundness(result.class_averages, 5.0, 120.0)
    assert r[7] > 0.95 > r[0]  # the blob is round, a view is not


def _finished_job(tmp_path):
    ps, *_ = make_particles(300, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=4)
    cfg = Class2DConfig(
        n_classes=5,
        max_res_A=10.0,
        n_online_em_iterations=3,
        batch_size_per_class=30,
        n_final_full_iterations=1,
        particle_diameter_A=120.0,
        annealing_start_iteration=1,
        n_annealing_iterations=1,
    )
    out = tmp_path / "job"
    Class2DJob(ps, cfg, out_dir=out).run_to_end()
    return out


def _run(argv):
    args = build_parser().parse_args(["select", *argv])
    return select_cli.main(args)


def test_select_auto_writes_exactly_the_auto_selected_particles(tmp_path, capsys):
    job = _finished_job(tmp_path)
    result = load_result(job)
    assert result.lineage is not None and result.particle_diameter_A == 120.0
    expected = auto_select(result).kept_classes()
    assert _run([str(job), "--auto", "--out", str(tmp_path / "auto.star")]) == 0
    out = capsys.readouterr().out
    assert "class ranking of" in out and out.count("\n") > result.n_classes
    back = starfile.read(tmp_path / "auto.star")["particles"]
    assert sorted(set(back["rlnClassNumber"])) == sorted(expected.tolist())
    assert len(back) == int(np.isin(result.class_number, expected).sum())
    chosen = result.particles["rlnImageName"][np.isin(result.class_number, expected)]
    index = lambda names: sorted(int(n.split("@")[0]) for n in names)  # noqa: E731
    assert index(back["rlnImageName"]) == index(chosen)
    # the user's choice on top of the ranking: a rejection of a kept class, and a keep of a
    # class the (strict) ranking rejects
    first = int(expected[0])
    assert (
        _run([str(job), "--auto", "--reject", str(first), "--out", str(tmp_path / "r.star")]) == 0
    )
    mine = starfile.read(tmp_path / "r.star")["particles"]
    assert set(mine["rlnClassNumber"]) == set(expected.tolist()) - {first}
    strict = [str(job), "--auto", "--threshold", "0.99", "--no-guard", "--keep", str(first)]
    assert _run([*strict, "--out", str(tmp_path / "k.star")]) == 0
    mine = starfile.read(tmp_path / "k.star")["particles"]
    assert set(mine["rlnClassNumber"]) == {first}
    # a stricter threshold keeps no more
    assert _run([str(job), "--auto", "--threshold", "0.99", "--no-guard"]) == 0
    assert "auto-selected" in capsys.readouterr().out


def test_select_needs_keep_or_auto(tmp_path, capsys):
    make_result(tmp_path / "r", n_classes=3)
    assert _run([str(tmp_path / "r"), "--out", str(tmp_path / "x.star")]) == 2
    assert "give --keep CLASSES or --auto" in capsys.readouterr().err
    assert _run([str(tmp_path / "r"), "--keep", "1", "--threshold", "0.5", "--out", "y"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["select", "r", "--auto", "--threshold", "2"])
    assert isinstance(select_cli._threshold("0.3"), float)
    with pytest.raises(argparse.ArgumentTypeError):
        select_cli._threshold("x")
