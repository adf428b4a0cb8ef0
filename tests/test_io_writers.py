"""Writers: RELION 3.1 particle STAR, class averages, model STAR; atomic writes; concat."""

from __future__ import annotations

import errno
import os
import stat

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from io_fixtures import (
    cs_fields,
    fill_up,
    make_relion31,
    relion30_block,
    relion31_blocks,
    write_cs,
    write_stack,
    write_star,
)
from napari_class2d.io.errors import DiskFullError, ParticleFileError
from napari_class2d.io.model import read_class_averages, read_model_star
from napari_class2d.io.particles import CTFParams, ImageSource, ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.writers import (
    atomic_write,
    write_class_averages,
    write_model_star,
    write_particle_star,
)

# -- atomic writes -------------------------------------------------------------------


def test_atomic_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, lambda tmp: tmp.write_text("first"))
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        atomic_write(path, lambda tmp: tmp.write_text("second"))
    assert str(path) in str(err.value)
    assert path.read_text() == "first"
    atomic_write(path, lambda tmp: tmp.write_text("second"), overwrite=True)
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp files left


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.txt"

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert list(tmp_path.iterdir()) == []
    path.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(path, failing, overwrite=True)
    assert path.read_text() == "old"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "x.txt", lambda tmp: tmp.write_text("x"))


def test_every_writer_refuses_to_overwrite(tmp_path):
    star, _, _ = make_relion31(tmp_path)
    ps = read_particles(star)
    write_particle_star(tmp_path / "o.star", ps)
    with pytest.raises(FileExistsError):
        write_particle_star(tmp_path / "o.star", ps)
    write_class_averages(tmp_path / "c.mrcs", np.zeros((2, 8, 8)), 1.0)
    with pytest.raises(FileExistsError):
        write_class_averages(tmp_path / "c.mrcs", np.zeros((2, 8, 8)), 1.0)
    write_model_star(tmp_path / "m.star", "c.mrcs", [0.5, 0.5], [10, 12], 1.0)
    with pytest.raises(FileExistsError):
        write_model_star(tmp_path / "m.star", "c.mrcs", [0.5, 0.5], [10, 12], 1.0)


# -- particle STAR -------------------------------------------------------------------


def test_subset_round_trip_keeps_columns_prunes_optics_adds_extras(tmp_path):
    images = write_stack(tmp_path / "stack.mrcs", 9, 16)
    blocks = relion31_blocks(9, groups=(1, 2, 5), pixel_sizes=(1.5, 1.5, 1.5))
    ps = read_particles(write_star(tmp_path / "in.star", blocks))
    rows = np.array([8, 0, 3, 5])  # groups 5, 1, 1, 5: group 2 is no longer used
    classes = np.array([3, 1, 1, 12])
    out = tmp_path / "sub" / "run_data.star"
    out.parent.mkdir()
    extra = pd.DataFrame({"rlnClassNumber": classes, "rlnAnglePsi": [10.0, 20.0, 30.0, 40.0]})
    write_particle_star(out, ps, rows=rows, extra_columns=extra)

    back = starfile.read(out, always_dict=True)
    optics, particles = back["optics"], back["particles"]
    original = blocks["particles"]
    assert list(particles.columns[: len(original.columns)]) == list(original.columns)
    assert list(optics["rlnOpticsGroup"]) == [1, 5]
    assert list(optics.columns) == list(blocks["optics"].columns)
    # 1-based class numbers written as integers
    assert particles["rlnClassNumber"].dtype.kind == "i"
    np.testing.assert_array_equal(particles["rlnClassNumber"], classes)
    np.testing.assert_allclose(particles["rlnAnglePsi"], [10, 20, 30, 40])  # replaced
    np.testing.assert_allclose(
        particles["rlnCoordinateX"], original["rlnCoordinateX"].to_numpy()[rows]
    )
    np.testing.assert_allclose(particles["rlnDefocusU"], original["rlnDefocusU"].to_numpy()[rows])
    # outside a RELION project, stack paths are absolute: every program finds them
    assert particles["rlnImageName"].iloc[0] == f"000009@{(tmp_path / 'stack.mrcs').resolve()}"
    again = read_particles(out)
    np.testing.assert_array_equal(again.read_images(np.arange(4)), images[rows])
    np.testing.assert_array_equal(again.optics_group, [5, 1, 1, 5])


def test_inside_a_relion_project_names_are_project_relative(tmp_path, monkeypatch):
    """RELION resolves image names against the project folder it runs in, so files
    written inside a project name stacks (and class averages) relative to it."""
    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    (project / "Class2D" / "job008").mkdir(parents=True)
    (project / "default_pipeline.star").write_text("data_pipeline_general\n")
    images = write_stack(project / "Extract" / "job005" / "mic1.mrcs", 4, 16)
    block = relion31_blocks(4, stack="Extract/job005/mic1.mrcs")
    monkeypatch.chdir(project)
    ps = read_particles(write_star(project / "Extract" / "job005" / "particles.star", block))
    out = project / "Class2D" / "job008" / "run_data.star"
    write_particle_star(out, ps, extra_columns={"rlnClassNumber": [1, 2, 2, 1]})
    names = starfile.read(out)["particles"]["rlnImageName"]
    assert list(names) == [f"{i:06d}@Extract/job005/mic1.mrcs" for i in (1, 2, 3, 4)]
    write_class_averages(out.parent / "run_classes.mrcs", np.zeros((2, 8, 8), np.float32), 4.0)
    write_model_star(out.parent / "run_model.star", "run_classes.mrcs", [0.5, 0.5], [9, 9], 4.0)
    refs = starfile.read(out.parent / "run_model.star")["model_classes"]["rlnReferenceImage"]
    assert list(refs) == [
        "000001@Class2D/job008/run_classes.mrcs",
        "000002@Class2D/job008/run_classes.mrcs",
    ]
    # and they read back from anywhere (the project is found from the file's folder)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(read_particles(out).read_images(np.array([3])), images[[3]])
    assert read_class_averages(out.parent / "run_model.star").images.shape == (2, 8, 8)


def test_extra_columns_may_cover_every_input_particle(tmp_path):
    star, _, _ = make_relion31(tmp_path, n=6)
    ps = read_particles(star)
    write_particle_star(
        tmp_path / "o.star", ps, rows=[4, 1], extra_columns={"rlnClassNumber": np.arange(1, 7)}
    )
    back = starfile.read(tmp_path / "o.star")["particles"]
    np.testing.assert_array_equal(back["rlnClassNumber"], [5, 2])
    with pytest.raises(ValueError, match="extra_columns has 3 rows"):
        write_particle_star(tmp_path / "p.star", ps, rows=[4, 1], extra_columns={"x": [1, 2, 3]})


def test_relion30_input_becomes_relion31(tmp_path):
    images = write_stack(tmp_path / "stack.mrcs", 6, 16)
    block = relion30_block(6)
    ps = read_particles(write_star(tmp_path / "in30.star", {"": block}))
    out = tmp_path / "out.star"
    write_particle_star(out, ps)
    back = starfile.read(out, always_dict=True)
    optics, particles = back["optics"], back["particles"]
    assert len(optics) == 1
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.5)
    assert optics["rlnVoltage"].iloc[0] == 300 and optics["rlnImageSize"].iloc[0] == 16
    assert optics["rlnImageDimensionality"].iloc[0] == 2
    # per-particle optics values moved to the optics table; origins now in Å
    for gone in ("rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX"):
        assert gone not in particles.columns
    np.testing.assert_allclose(particles["rlnOriginXAngst"], block["rlnOriginX"] * 1.5)
    again = read_particles(out)
    assert again.source_format == "relion3.1"
    np.testing.assert_allclose(again.ctf.defocus_u_A, ps.ctf.defocus_u_A)
    np.testing.assert_allclose(again.ctf.amplitude_contrast, 0.07)
    np.testing.assert_array_equal(again.read_images([5]), images[[5]])


def test_cryosparc_input_written_with_relion_names(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 5, 16)
    fields = cs_fields(5, "stack.mrcs")
    ps = read_particles(write_cs(tmp_path / "p.cs", fields))
    out = tmp_path / "from_cs.star"
    write_particle_star(out, ps, extra_columns={"rlnClassNumber": [1, 2, 3, 1, 2]})
    back = starfile.read(out, always_dict=True)
    particles = back["particles"]
    assert not any("/" in c for c in particles.columns)  # no cryoSPARC field names
    np.testing.assert_allclose(particles["rlnDefocusU"], fields["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(
        particles["rlnDefocusAngle"],
        np.degrees(fields["ctf/df_angle_rad"].astype(float)),
        atol=1e-4,
    )
    np.testing.assert_allclose(particles["rlnPhaseShift"], 90, rtol=1e-6)
    assert "rlnCtfBfactor" in particles.columns
    assert back["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(1.25)
    again = read_particles(out)
    np.testing.assert_allclose(again.ctf.defocus_v_A, ps.ctf.defocus_v_A, rtol=1e-9)
    np.testing.assert_array_equal(again.read_images(np.arange(5)), ps.read_images(np.arange(5)))


def test_bare_stack_written_without_ctf(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 4, 8, voxel_size=2.0)
    ps = read_particles(tmp_path / "stack.mrcs")
    write_particle_star(tmp_path / "o.star", ps)
    optics = starfile.read(tmp_path / "o.star", always_dict=True)["optics"]
    assert "rlnVoltage" not in optics.columns
    again = read_particles(tmp_path / "o.star")
    assert again.ctf is None and again.pixel_size_A[0] == 2.0


def test_outside_a_project_names_are_absolute_and_read_from_anywhere(tmp_path, monkeypatch):
    """Beside the stack or elsewhere, the written names find the stack whatever folder
    a program (RELION included) runs in."""
    star, _, images = make_relion31(tmp_path)
    ps = read_particles(star)
    (tmp_path / "elsewhere").mkdir()
    for out in (tmp_path / "o.star", tmp_path / "elsewhere" / "o.star"):
        names = starfile.read(write_particle_star(out, ps))["particles"]["rlnImageName"]
        assert names.iloc[0] == f"000001@{(tmp_path / 'stack.mrcs').resolve()}"
        monkeypatch.chdir(tmp_path / "elsewhere")
        np.testing.assert_array_equal(read_particles(out).read_images(np.array([1])), images[[1]])


# -- concat --------------------------------------------------------------------------


def _set(tmp_path, name, n, apix, seed):
    folder = tmp_path / name
    folder.mkdir()
    images = write_stack(folder / "stack.mrcs", n, 16, seed=seed)
    return read_particles(
        write_star(folder / "p.star", relion31_blocks(n, pixel_sizes=(apix,)))
    ), images


def test_concat_renumbers_only_clashing_optics_groups(tmp_path):
    a, ia = _set(tmp_path, "a", 3, 1.5, 1)
    b, ib = _set(tmp_path, "b", 4, 2.0, 2)  # also group 1, but another pixel size
    c, ic = _set(tmp_path, "c", 2, 1.5, 3)  # group 1 with the same optics as a
    ps = ParticleSet.concat([a, b, c])
    assert ps.n_particles == 9
    np.testing.assert_array_equal(ps.optics_group, [1, 1, 1, 2, 2, 2, 2, 1, 1])
    np.testing.assert_array_equal(ps.metadata["rlnOpticsGroup"], ps.optics_group)
    assert list(ps.optics["rlnOpticsGroup"]) == [1, 2]
    assert list(ps.optics["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2"]
    assert ps.pixel_size_by_optics_group == {1: 1.5, 2: 2.0}
    np.testing.assert_array_equal(ps.read_images(np.arange(9)), np.concatenate([ia, ib, ic]))
    np.testing.assert_allclose(
        ps.ctf.defocus_u_A, np.concatenate([s.ctf.defocus_u_A for s in (a, b, c)])
    )
    # and it writes as a valid RELION 3.1 file
    out = write_particle_star(tmp_path / "all.star", ps)
    again = read_particles(out)
    assert again.pixel_size_by_optics_group == {1: 1.5, 2: 2.0}
    np.testing.assert_array_equal(again.read_images([8]), ic[[1]])


def test_concat_mixes_relion30_and_31(tmp_path):
    a, _ = _set(tmp_path, "a", 3, 1.5, 1)
    folder = tmp_path / "old"
    folder.mkdir()
    write_stack(folder / "stack.mrcs", 6, 16)
    old = read_particles(write_star(folder / "p30.star", {"": relion30_block(6)}))
    ps = ParticleSet.concat([a, old])
    assert ps.optics is not None
    assert set(ps.optics["rlnOpticsGroup"]) == set(np.unique(ps.optics_group))
    # a's group 1 is 1.5 Å / 300 kV / AC 0.1; the old set's AC is 0.07: a new group
    assert len(np.unique(ps.optics_group)) == 2


def test_concat_refuses_mixed_boxes_and_ctf(tmp_path):
    a, _ = _set(tmp_path, "a", 3, 1.5, 1)
    images = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="different box sizes"):
        ParticleSet.concat([a, ParticleSet.from_array(images, 1.5)])
    no_ctf = ParticleSet.from_array(np.zeros((2, 16, 16), np.float32), 1.5)
    with pytest.raises(ValueError, match="with and without CTF"):
        ParticleSet.concat([a, no_ctf])
    ctf = CTFParams(*(np.ones(2) for _ in range(8)))
    both = ParticleSet.concat([ParticleSet.from_array(np.ones((2, 16, 16)), 1.5, ctf=ctf)] * 2)
    assert both.n_particles == 4 and both.optics is None


# -- class averages and models -------------------------------------------------------


def test_class_averages_stack(tmp_path):
    averages = np.random.default_rng(0).normal(size=(5, 24, 24))
    path = write_class_averages(tmp_path / "run_classes.mrcs", averages, 3.2)
    with mrcfile.open(path) as mrc:
        assert mrc.data.shape == (5, 24, 24) and mrc.data.dtype == np.float32
        assert int(mrc.header.mode) == 2 and int(mrc.header.ispg) == 0
        assert mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(3.2)
        np.testing.assert_allclose(mrc.data, averages.astype(np.float32))
    back = read_class_averages(path)
    assert back.pixel_size_A == pytest.approx(3.2)
    np.testing.assert_array_equal(back.class_numbers, [1, 2, 3, 4, 5])


def test_model_star_round_trip(tmp_path):
    averages = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    write_class_averages(tmp_path / "run_classes.mrcs", averages, 2.5)
    path = write_model_star(
        tmp_path / "run_model.star",
        "run_classes.mrcs",
        [0.5, 0.3, 0.2],
        [8.0, np.inf, 12.0],
        2.5,
        extra_class_columns={"rlnAccuracyRotations": [1.0, 2.0, 3.0]},
    )
    raw = starfile.read(path, always_dict=True)
    general, classes = raw["model_general"], raw["model_classes"]
    assert general["rlnReferenceDimensionality"] == 2
    assert general["rlnNrClasses"] == 3 and general["rlnOriginalImageSize"] == 16
    assert general["rlnPixelSize"] == pytest.approx(2.5)
    # outside a RELION project the stack is named by its absolute path (as particle stacks)
    stack = (tmp_path / "run_classes.mrcs").resolve()
    assert list(classes["rlnReferenceImage"]) == [f"{i:06d}@{stack}" for i in (1, 2, 3)]
    np.testing.assert_allclose(classes["rlnEstimatedResolution"], [8, 999, 12])
    model = read_model_star(path)
    assert model.n_classes == 3
    np.testing.assert_allclose(model.resolution_A, [8, np.inf, 12])
    np.testing.assert_allclose(model.distribution, [0.5, 0.3, 0.2])
    back = read_class_averages(path)
    np.testing.assert_array_equal(back.images, averages)
    assert back.pixel_size_A == pytest.approx(2.5)


def test_relion_class2d_model_in_a_project(tmp_path):
    """A RELION Class2D model names its stack relative to the project folder."""
    job = tmp_path / "Class2D" / "job008"
    job.mkdir(parents=True)
    averages = np.random.default_rng(1).normal(size=(4, 12, 12)).astype(np.float32)
    write_class_averages(job / "run_it025_classes.mrcs", averages, 4.0)
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": 12,
        "rlnPixelSize": 4.0,
        "rlnNrClasses": 4,
    }
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": [
                f"{i:06d}@Class2D/job008/run_it025_classes.mrcs" for i in (1, 2, 3, 4)
            ],
            "rlnClassDistribution": [0.4, 0.3, 0.2, 0.1],
            "rlnAccuracyRotations": [999.0] * 4,
            "rlnAccuracyTranslationsAngst": [999.0] * 4,
            "rlnEstimatedResolution": [12.0, 15.0, 999.0, 20.0],
        }
    )
    model = job / "run_it025_model.star"
    starfile.write({"model_general": general, "model_classes": classes}, model)
    back = read_class_averages(model)
    np.testing.assert_array_equal(back.images, averages)
    np.testing.assert_allclose(back.resolution_A, [12, 15, np.inf, 20])


def test_relion_3d_models_are_read_but_not_as_class_averages(shared_data):
    path = shared_data / "star_files/relion1_betagal_tests/ref_it002_model.star"
    model = read_model_star(path)
    assert model.n_classes == 1 and model.reference_dimensionality == 3
    assert model.pixel_size_A == pytest.approx(3.540002)
    assert model.distribution[0] == 1.0
    assert model.reference_paths == [None]  # test_output/out_it002_class001.mrc is absent
    assert np.isnan(model.resolution_A[0])  # no rlnEstimatedResolution in RELION 1 models
    with pytest.raises(ParticleFileError, match="3D references"):
        read_class_averages(path)
    refine = read_model_star(
        shared_data / "star_files/emtools_refine3d/run_it016_half1_model.star"
    )
    assert refine.resolution_A[0] == pytest.approx(3.354503)


def test_model_reader_errors(tmp_path, shared_data):
    path = shared_data / "star_files/relion1_betagal_tests/ref_it002_data.star"
    with pytest.raises(ParticleFileError, match="no data_model_classes") as err:
        read_model_star(path)
    assert err.value.path == path
    missing = tmp_path / "run_model.star"
    write_model_star(missing, "absent.mrcs", [1.0], [10.0], 1.0, original_image_size=8)
    with pytest.raises(ParticleFileError, match="not found") as err:
        read_class_averages(missing)
    assert err.value.row == 0 and err.value.column == "rlnReferenceImage"


# -- faults found on real files --------------------------------------------------------


def test_image_names_with_spaces_are_written_quoted_as_relion_does(tmp_path):
    """Fault 3: stacks whose names hold spaces are written ``"000001@/x/my stack.mrcs"``
    (writing used to fail after the whole job had computed)."""
    images = write_stack(tmp_path / "my stack.mrcs", 3, 16)
    ps = ParticleSet(
        pd.DataFrame({"rlnImageName": [f"{i:06d}@my stack.mrcs" for i in (1, 2, 3)]}),
        ImageSource([tmp_path / "my stack.mrcs"], np.zeros(3, np.int64), np.arange(3)),
        1.5,
        16,
    )
    out = write_particle_star(tmp_path / "out.star", ps)
    text = out.read_text()
    assert f'"000002@{tmp_path / "my stack.mrcs"}"' in text
    back = starfile.read(out)["particles"]
    assert list(back["rlnImageName"]) == [
        f"{i:06d}@{tmp_path / 'my stack.mrcs'}" for i in (1, 2, 3)
    ]
    again = read_particles(out)
    np.testing.assert_array_equal(again.read_images([2, 0]), images[[2, 0]])


def test_a_value_a_star_file_cannot_hold_is_refused_before_writing(tmp_path):
    ps = ParticleSet.from_array(np.zeros((2, 8, 8), np.float32), 1.0)
    extra = {"rlnMicrographName": ['say "cheese".mrc', "b.mrc"]}
    with pytest.raises(ValueError, match="double quote"):
        write_particle_star(tmp_path / "out.star", ps, extra_columns=extra)
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_readable_as_the_umask_allows(tmp_path):
    """Fault 10: files are created 0666 less the umask (the temporary file used to make
    them 0600, unreadable by the rest of a lab's group)."""
    star, _, _ = make_relion31(tmp_path)
    ps = read_particles(star)
    old = os.umask(0o022)
    try:
        paths = [
            write_particle_star(tmp_path / "a.star", ps),
            write_class_averages(tmp_path / "a.mrcs", np.zeros((2, 8, 8)), 1.0),
            atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x")),
        ]
        os.umask(0o002)
        paths.append(write_particle_star(tmp_path / "b.star", ps))
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(p.stat().st_mode) for p in paths]
    assert modes == [0o644, 0o644, 0o644, 0o664]


def test_a_full_disk_names_the_folder_and_keeps_the_old_file(tmp_path, small_filesystem):
    """Fault 6: on a real, full file system a write fails with "no space left on FOLDER
    (needed ...)", the file it would replace is intact and no temporary file is left."""
    disk = small_filesystem(256 * 1024)
    atomic_write(disk / "data.bin", lambda tmp: tmp.write_bytes(b"old" * 1000))
    fill_up(disk)
    payload = b"x" * 100_000
    with pytest.raises(DiskFullError) as err:
        atomic_write(
            disk / "data.bin", lambda tmp: tmp.write_bytes(payload), True, size_hint=len(payload)
        )
    assert str(err.value).startswith(f"no space left on {disk} (needed 97.7 KiB")
    assert err.value.errno == errno.ENOSPC
    assert (disk / "data.bin").read_bytes() == b"old" * 1000
    assert sorted(p.name for p in disk.iterdir()) == ["data.bin", "filler"]


def test_a_full_disk_reported_by_any_writer(tmp_path, monkeypatch):
    """Fault 6 without a small file system: the OS error of a full disk becomes the same
    one-line error, and nothing is left behind."""
    (tmp_path / "run_data.star").write_text("old " * 100)

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path} \\(needed about 400"):
        atomic_write(tmp_path / "run_data.star", full, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run_data.star"]
    assert (tmp_path / "run_data.star").read_text() == "old " * 100
