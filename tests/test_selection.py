"""Class selection without Qt: loading results, choosing classes, exporting subsets."""

from __future__ import annotations

import argparse

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from _selection_data import make_result
from napari_class2d.cli import select as select_cli
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.selection import (
    classes_by_threshold,
    export_selection,
    find_result_files,
    load_result,
    sort_classes,
)


def test_load_result_counts_resolution_eca(tmp_path):
    truth = make_result(tmp_path, n_particles=80, n_classes=6)
    res = load_result(tmp_path)
    assert res.n_classes == 6 and res.n_particles == 80
    np.testing.assert_array_equal(res.class_counts, np.bincount(truth["classes"] - 1))
    np.testing.assert_allclose(res.class_resolution_A, truth["resolution"])
    np.testing.assert_allclose(res.class_eca, np.linspace(1, 3, 6))
    np.testing.assert_allclose(res.class_averages, truth["averages"])
    assert res.pixel_size_A == pytest.approx(2.0)
    assert list(res.particles.columns) == list(truth["particles"].columns)


def test_relion_folder_takes_last_iteration(tmp_path):
    make_result(tmp_path, prefix="run_it005", n_classes=3, seed=1)
    make_result(tmp_path, prefix="run_it025", n_classes=4, seed=2)
    make_result(tmp_path, prefix="run_it010", n_classes=5, seed=3)
    data, model, classes, it = find_result_files(tmp_path)
    assert data.name == "run_it025_data.star" and it == 25
    assert model.name == "run_it025_model.star" and classes.name == "run_it025_classes.mrcs"
    assert load_result(tmp_path).n_classes == 4
    # the model file names the same result
    assert load_result(tmp_path / "run_it010_model.star").n_classes == 5


def test_relion30_result_without_model_or_eca(tmp_path):
    truth = make_result(tmp_path, relion_30=True, eca=False)
    (tmp_path / "run_model.star").unlink()
    res = load_result(tmp_path / "run_data.star")
    assert res.optics is None
    assert np.isnan(res.class_eca).all() and np.isinf(res.class_resolution_A).all()
    assert res.n_classes == len(truth["averages"])  # from the class-average stack


def test_not_a_result_is_refused_with_reason(tmp_path):
    starfile.write(
        pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnImagePixelSize": [1.0]}),
        tmp_path / "p.star",
    )
    with pytest.raises(ParticleFileError, match="rlnClassNumber"):
        load_result(tmp_path / "p.star")
    with pytest.raises(FileNotFoundError, match="missing.star: result particle file not found"):
        load_result(tmp_path / "missing.star")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no run_data.star"):
        load_result(tmp_path / "d")


def test_bad_class_number_names_row(tmp_path):
    make_result(tmp_path, n_classes=3)
    data = starfile.read(tmp_path / "run_data.star")
    data["particles"].loc[7, "rlnClassNumber"] = 9
    starfile.write(data, tmp_path / "run_data.star", overwrite=True)
    with pytest.raises(ParticleFileError, match="row 7.*class 9 but the result has 3"):
        load_result(tmp_path)


def test_export_keeps_exactly_the_kept_classes(tmp_path):
    truth = make_result(tmp_path / "res", n_particles=70, n_classes=5)
    out = tmp_path / "subset.star"
    n = export_selection(
        tmp_path / "res",
        [1, 2],
        out,
        rejected_out=tmp_path / "rej.star",
        classes_out=tmp_path / "kept.mrcs",
    )
    expected = truth["particles"][np.isin(truth["classes"], [1, 2])].reset_index(drop=True)
    assert n == len(expected)
    back = starfile.read(out)
    got = back["particles"]
    # every original column kept with its values (floats as written to text)
    cols = [c for c in expected.columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(got[cols], expected[cols], check_dtype=False, atol=1e-3)
    # image names point to the same stacks, by absolute path (outside a RELION project)
    res = (tmp_path / "res").resolve()
    assert (got["rlnImageName"] == expected["rlnImageName"].str.replace("@", f"@{res}/")).all()
    # only optics group 1 is used by classes 1-2
    assert back["optics"]["rlnOpticsGroup"].tolist() == [1]
    assert set(truth["optics"].columns) <= set(back["optics"].columns)
    assert back["optics"]["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]
    rej = starfile.read(tmp_path / "rej.star")
    assert len(rej["particles"]) == 70 - n
    assert set(rej["particles"]["rlnClassNumber"]) == {3, 4, 5}
    with mrcfile.open(tmp_path / "kept.mrcs") as mrc:
        np.testing.assert_allclose(mrc.data, truth["averages"][[0, 1]])
        assert mrc.voxel_size.x == pytest.approx(2.0)


def test_export_never_overwrites_unless_asked(tmp_path):
    make_result(tmp_path / "res")
    out = tmp_path / "subset.star"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_selection(tmp_path / "res", [1], out)
    assert out.read_text() == "precious"
    export_selection(tmp_path / "res", [1], out, overwrite=True)
    assert "rlnClassNumber" in out.read_text()
    with pytest.raises(ValueError, match="out of range"):
        export_selection(tmp_path / "res", [0, 6], tmp_path / "x.star")
    assert not (tmp_path / "x.star").exists()


def test_threshold_and_sorting(tmp_path):
    make_result(tmp_path, n_classes=5)
    res = load_result(tmp_path)
    # resolutions 8, 11, 14, 17, 20 Å; ECA 1, 1.5, 2, 2.5, 3
    assert classes_by_threshold(res, "resolution", 14.0, "below").tolist() == [1, 2, 3]
    assert classes_by_threshold(res, "eca", 2.5, "above").tolist() == [4, 5]
    big = classes_by_threshold(res, "count", res.class_counts.max(), "above")
    assert (res.class_counts[big - 1] == res.class_counts.max()).all()
    order = sort_classes(res, "count")
    assert (np.diff(res.class_counts[order - 1]) <= 0).all()
    assert sort_classes(res, "resolution").tolist() == [1, 2, 3, 4, 5]


def _cli(argv):
    parser = argparse.ArgumentParser()
    select_cli.add_args(parser)
    return select_cli.main(parser.parse_args(argv))


def test_select_command(tmp_path, capsys):
    truth = make_result(tmp_path / "res", n_particles=50, n_classes=4)
    out = tmp_path / "subset.star"
    rc = _cli([str(tmp_path / "res"), "--keep", "2,4", "--out", str(out)])
    n_expected = int(np.isin(truth["classes"], [2, 4]).sum())
    assert rc == 0
    assert f"wrote {n_expected} particles" in capsys.readouterr().out
    assert set(starfile.read(out)["particles"]["rlnClassNumber"]) == {2, 4}
    # refuses to overwrite, says why, exit code 2
    rc = _cli([str(tmp_path / "res"), "--keep", "1", "--out", str(out)])
    assert rc == 2 and "overwrite" in capsys.readouterr().err
    rc = _cli([str(tmp_path / "res"), "--keep", "1", "--out", str(out), "--overwrite"])
    assert rc == 0
    with pytest.raises(SystemExit):
        _cli([str(tmp_path / "res"), "--keep", "a,b", "--out", str(out)])


def test_real_relion_class2d_data_star(shared_data, tmp_path):
    """A real RELION 2D classification particle file (RELION 1.x, β-galactosidase)."""
    data = shared_data / "star_files/relion1_betagal_tests/ap_s_c2d.star"
    res = load_result(data)
    original = starfile.read(data)
    assert res.n_particles == len(original)
    np.testing.assert_array_equal(
        res.class_counts.sum(), len(original)
    )  # every particle counted once
    keep = sort_classes(res, "count")[:2]
    n = export_selection(res, keep, tmp_path / "subset.star")
    back = starfile.read(tmp_path / "subset.star")
    assert n == len(back["particles"]) == int(original["rlnClassNumber"].isin(keep).sum())
    assert set(back["particles"]["rlnClassNumber"]) == set(keep.tolist())
    # RELION 1.x per-particle optics moved into an optics table, origins in Å
    assert "rlnImagePixelSize" in back["optics"] and "rlnOriginXAngst" in back["particles"]


def test_select_never_writes_over_the_result_itself(tmp_path, capsys):
    """Fault 9: ``select --out RESULT/run_data.star`` is refused, even with --overwrite (it
    would replace the classification with a subset of it)."""
    make_result(tmp_path / "res", n_particles=50, n_classes=4)
    own = tmp_path / "res" / "run_data.star"
    before = own.read_bytes()
    for extra in ([], ["--overwrite"]):
        rc = _cli([str(tmp_path / "res"), "--keep", "1", "--out", str(own), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "classification result itself" in err and str(own) in err
    classes = tmp_path / "res" / "run_classes.mrcs"
    subset = tmp_path / "s.star"
    rc = _cli([str(tmp_path / "res"), "--keep", "1", "--out", str(subset),
               "--classes-out", str(classes), "--overwrite"])  # fmt: skip
    assert rc == 2 and "classification result itself" in capsys.readouterr().err
    assert own.read_bytes() == before and not subset.exists()


def test_selecting_an_empty_class_warns(tmp_path, capsys):
    """Fault 8: keeping a class that holds no particle is allowed but said."""
    truth = make_result(tmp_path / "res", n_particles=50, n_classes=4)
    data = starfile.read(tmp_path / "res" / "run_data.star", always_dict=True)
    data["particles"].loc[data["particles"]["rlnClassNumber"] == 3, "rlnClassNumber"] = 1
    starfile.write(data, tmp_path / "res" / "run_data.star", overwrite=True)
    rc = _cli([str(tmp_path / "res"), "--keep", "2,3", "--out", str(tmp_path / "s.star")])
    captured = capsys.readouterr()
    assert rc == 0
    assert "warning: class 3 holds no particles" in captured.err
    assert f"wrote {int((truth['classes'] == 2).sum())} particles" in captured.out
