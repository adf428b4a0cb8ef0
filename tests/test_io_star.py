"""RELION STAR particle files of every version, and every way one can be bad."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pytest
import starfile

from io_fixtures import (
    ctf_columns,
    image_names,
    make_relion31,
    relion30_block,
    relion31_blocks,
    write_stack,
    write_star,
)
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.readers import read_particles


def test_relion31_values_units_and_images(tmp_path):
    star, blocks, images = make_relion31(tmp_path, n=6, box=16)
    ps = read_particles(star)
    p = blocks["particles"]
    assert ps.source_format == "relion3.1"
    assert (ps.n_particles, ps.box) == (6, 16)
    np.testing.assert_allclose(ps.pixel_size_A, 1.5)
    np.testing.assert_allclose(ps.ctf.defocus_u_A, p["rlnDefocusU"], atol=1e-6)
    np.testing.assert_allclose(ps.ctf.defocus_v_A, p["rlnDefocusV"], atol=1e-6)
    np.testing.assert_allclose(ps.ctf.astigmatism_angle_deg, p["rlnDefocusAngle"], atol=1e-6)
    np.testing.assert_allclose(ps.ctf.voltage_kV, 300)
    np.testing.assert_allclose(ps.ctf.cs_mm, 2.7)
    np.testing.assert_allclose(ps.ctf.amplitude_contrast, 0.1)
    # metadata = the particle block with its original columns, optics = the optics block
    assert list(ps.metadata.columns) == list(p.columns)
    assert list(ps.optics.columns) == list(blocks["optics"].columns)
    np.testing.assert_array_equal(ps.read_images([5, 0, 3]), images[[5, 0, 3]])


@pytest.mark.parametrize("order", ["optics_first", "particles_first"])
def test_relion31_several_optics_groups_either_block_order(tmp_path, order):
    write_stack(tmp_path / "stack.mrcs", 9, 16)
    blocks = relion31_blocks(9, groups=(1, 2, 5), pixel_sizes=(1.0, 1.5, 2.0))
    if order == "particles_first":
        blocks = {"particles": blocks["particles"], "optics": blocks["optics"]}
    star = write_star(tmp_path / "p.star", blocks)
    ps = read_particles(star)
    assert ps.pixel_size_by_optics_group == {1: 1.0, 2: 1.5, 5: 2.0}
    np.testing.assert_array_equal(ps.optics_group, [1, 2, 5] * 3)
    # voltage comes from each particle's optics group (300, 200, 300 kV)
    np.testing.assert_allclose(ps.ctf.voltage_kV, [300, 200, 300] * 3)


def test_relion30_pixel_size_from_detector_and_magnification(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    block = relion30_block(6)
    star = write_star(tmp_path / "p30.star", {"": block})
    ps = read_particles(star)
    assert ps.source_format == "relion3.0"
    assert ps.optics is None
    np.testing.assert_allclose(ps.pixel_size_A, 1.5 * 1e4 / 10000)
    np.testing.assert_allclose(ps.ctf.amplitude_contrast, 0.07)
    np.testing.assert_allclose(ps.ctf.phase_shift_deg, 0)  # default
    np.testing.assert_allclose(ps.ctf.bfactor_A2, 0)  # default
    assert "rlnOriginX" in ps.metadata.columns  # RELION 1-3.0 origins (pixels) are kept


def test_user_pixel_size_differing_from_the_file_warns_and_is_not_used(tmp_path):
    star, _, _ = make_relion31(tmp_path)
    with pytest.warns(UserWarning, match="is not used"):
        ps = read_particles(star, pixel_size_A=3.0)
    np.testing.assert_allclose(ps.pixel_size_A, 1.5)


def test_relion30_image_pixel_size_and_user_fallback(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 4, 16)
    block = relion30_block(4).drop(columns=["rlnMagnification", "rlnDetectorPixelSize"])
    star = write_star(tmp_path / "nopix.star", {"": block})
    with pytest.raises(ParticleFileError, match="no pixel size") as err:
        read_particles(star)
    assert err.value.path == star
    np.testing.assert_allclose(read_particles(star, pixel_size_A=2.5).pixel_size_A, 2.5)
    block["rlnImagePixelSize"] = 3.25
    star = write_star(tmp_path / "imagepix.star", {"": block})
    np.testing.assert_allclose(read_particles(star).pixel_size_A, 3.25)


def test_relion1_images_block_and_no_ctf(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 5, 16)
    block = pd.DataFrame(
        {
            "rlnImageName": image_names("stack.mrcs", range(5)),
            "rlnOriginX": np.zeros(5),
            "rlnOriginY": np.zeros(5),
        }
    )
    star = write_star(tmp_path / "old.star", {"images": block})
    ps = read_particles(star, pixel_size_A=2.0)
    assert ps.ctf is None
    assert ps.n_particles == 5
    assert ps.source_format == "relion3.0"


def test_image_names_with_several_stacks_and_mrcs_suffix(tmp_path):
    a = write_stack(tmp_path / "a.mrcs", 3, 8, seed=1)
    (tmp_path / "sub").mkdir()
    b = write_stack(tmp_path / "sub" / "b.mrcs", 4, 8, seed=2)
    block = relion30_block(5)
    block["rlnImageName"] = [
        "000003@a.mrcs",
        "4@sub/b.mrcs",
        "000001@a.mrcs:mrcs",
        "000002@sub/b.mrcs",
        "000002@a.mrcs",
    ]
    ps = read_particles(write_star(tmp_path / "p.star", {"": block}))
    assert len(ps.images.stacks) == 2
    expected = np.stack([a[2], b[3], a[0], b[1], a[1]])
    np.testing.assert_array_equal(ps.read_images(np.arange(5)), expected)


def test_paths_resolve_via_project_dir_then_as_is(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    (project / "Class2D" / "job008" / "deep").mkdir(parents=True)
    data = write_stack(project / "Extract" / "job005" / "mic1.mrcs", 4, 8)
    block = relion30_block(4, stack="Extract/job005/mic1.mrcs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    star = write_star(elsewhere / "p.star", {"": block})
    with pytest.raises(ParticleFileError, match="not found"):
        read_particles(star)
    ps = read_particles(star, project_dir=project)
    np.testing.assert_array_equal(ps.read_images([2]), data[[2]])
    # as-is: relative to the working directory (RELION runs from the project folder)
    monkeypatch.chdir(project)
    assert read_particles(star).n_particles == 4
    # a STAR file inside the project (Class2D/job008/x.star) finds the project by itself
    monkeypatch.chdir(tmp_path)
    inside = write_star(project / "Class2D" / "job008" / "run_data.star", {"": block})
    assert read_particles(inside).n_particles == 4


def test_missing_stack_names_star_row_and_every_path_tried(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"].loc[4, "rlnImageName"] = "000001@gone/missing.mrcs"
    star = write_star(tmp_path / "p.star", blocks)
    project = tmp_path / "proj"
    with pytest.raises(ParticleFileError) as err:
        read_particles(star, project_dir=project)
    e = err.value
    assert e.path == star and e.row == 4 and e.column == "rlnImageName"
    msg = str(e)
    assert str(tmp_path / "gone" / "missing.mrcs") in msg
    assert str(project / "gone" / "missing.mrcs") in msg
    assert "gone/missing.mrcs," in msg  # as-is


def test_index_beyond_stack_names_star_row_and_stack(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"].loc[3, "rlnImageName"] = "000007@stack.mrcs"
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match="image 7 is beyond the end of stack") as err:
        read_particles(star)
    assert err.value.path == star and err.value.row == 3
    assert str(tmp_path / "stack.mrcs") in str(err.value)


@pytest.mark.parametrize(
    ("name", "row"), [("0@stack.mrcs", 2), ("abc@stack.mrcs", 1), ("000001@", 0)]
)
def test_malformed_image_names_name_the_row(tmp_path, name, row):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].astype(object)
    blocks["particles"].loc[row, "rlnImageName"] = name
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError) as err:
        read_particles(star)
    assert err.value.path == star and err.value.row == row
    assert err.value.column == "rlnImageName"


def test_mixed_box_sizes_are_refused(tmp_path):
    write_stack(tmp_path / "a.mrcs", 3, 16)
    write_stack(tmp_path / "b.mrcs", 3, 24)
    blocks = relion31_blocks(6)
    blocks["particles"]["rlnImageName"] = image_names("a.mrcs", range(3)) + image_names(
        "b.mrcs", range(3)
    )
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match="different box sizes") as err:
        read_particles(star)
    assert err.value.path == star
    assert "b.mrcs (row 3)" in str(err.value) and "24 px" in str(err.value)


def test_optics_image_size_must_match_stacks(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6, box=32)
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match="rlnImageSize 32") as err:
        read_particles(star)
    assert err.value.column == "rlnImageSize"


def test_stack_problems_are_reported_with_the_star_file(tmp_path):
    path = tmp_path / "stack.mrcs"
    write_stack(path, 6, 16)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4)
    star = write_star(tmp_path / "p.star", relion31_blocks(6))
    with pytest.raises(ParticleFileError, match="truncated") as err:
        read_particles(star)
    assert err.value.path == star and str(path) in str(err.value)


@pytest.mark.parametrize("missing", ["rlnVoltage", "rlnDefocusAngle", "rlnAmplitudeContrast"])
def test_partial_ctf_columns_name_the_missing_one(tmp_path, missing):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks = {name: b.drop(columns=[missing], errors="ignore") for name, b in blocks.items()}
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match=f"not {missing}") as err:
        read_particles(star)
    assert err.value.path == star and err.value.column == missing


def test_no_ctf_columns_means_no_ctf(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["optics"] = blocks["optics"].drop(
        columns=["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
    )
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    )
    ps = read_particles(write_star(tmp_path / "p.star", blocks))
    assert ps.ctf is None and not ps.has_ctf


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_ctf_value_names_row_and_column(tmp_path, bad):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"].loc[2, "rlnDefocusV"] = bad
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match="not a finite number") as err:
        read_particles(star)
    assert (err.value.path, err.value.row, err.value.column) == (star, 2, "rlnDefocusV")


def test_unknown_optics_group_names_the_row(tmp_path):
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"].loc[5, "rlnOpticsGroup"] = 9
    star = write_star(tmp_path / "p.star", blocks)
    with pytest.raises(ParticleFileError, match="optics group 9") as err:
        read_particles(star)
    assert (err.value.row, err.value.column) == (5, "rlnOpticsGroup")


def test_empty_and_unreadable_star_files(tmp_path):
    empty = tmp_path / "empty.star"
    empty.write_text("")
    with pytest.raises(ParticleFileError, match="empty") as err:
        read_particles(empty)
    assert err.value.path == empty
    comments = tmp_path / "comments.star"
    comments.write_text("# nothing here\n\n")
    with pytest.raises(ParticleFileError, match="no data blocks") as err:
        read_particles(comments)
    assert err.value.path == comments
    with pytest.raises(ParticleFileError, match="not found"):
        read_particles(tmp_path / "absent.star")


def test_star_without_particle_block(tmp_path):
    star = write_star(
        tmp_path / "coords.star",
        {"": pd.DataFrame({"rlnCoordinateX": [1.0, 2.0], "rlnCoordinateY": [3.0, 4.0]})},
    )
    with pytest.raises(ParticleFileError, match="no particle block") as err:
        read_particles(star)
    assert err.value.path == star and err.value.column == "rlnImageName"


def test_particle_block_without_rows(tmp_path):
    star = tmp_path / "norows.star"
    star.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n")
    with pytest.raises(ParticleFileError, match="no rows|no particle block") as err:
        read_particles(star)
    assert err.value.path == star


def test_unknown_suffix(tmp_path):
    path = tmp_path / "particles.txt"
    path.write_text("x")
    with pytest.raises(ParticleFileError, match="unknown particle file type '.txt'") as err:
        read_particles(path)
    assert err.value.path == path


def test_metadata_only_mode_parses_without_stacks(tmp_path):
    blocks = relion31_blocks(6, box=64)
    star = write_star(tmp_path / "p.star", blocks)
    ps = read_particles(star, check_stacks=False)
    assert ps.n_particles == 6 and ps.box == 64
    with pytest.raises(ParticleFileError, match="not found"):
        ps.read_images([0])  # the stack is needed only now


def _big_star(path, n, stack):
    """A RELION 3.1 STAR file of ``n`` particles written quickly with numpy."""
    rng = np.random.default_rng(0)
    du = rng.uniform(5000, 30000, n)
    idx = np.arange(1, n + 1)
    names = np.char.add(np.char.zfill(idx.astype(str), 6), "@" + stack)
    lines = np.char.add(
        np.char.add(names, "\t1\t"),
        np.char.add(np.char.mod("%.2f", du), np.char.add("\t", np.char.mod("%.2f", du - 100))),
    )
    head = (
        "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnVoltage\n"
        "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImageSize\n"
        "_rlnImageDimensionality\n1 1.06 300 2.7 0.1 256 2\n\n"
        "data_particles\n\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n"
        "_rlnDefocusV\n_rlnDefocusAngle\n"
    )
    with open(path, "w") as fh:
        fh.write(head)
        fh.write("\t45.0\n".join(lines.tolist()) + "\t45.0\n")


@pytest.mark.slow
def test_a_100_gb_data_set_opens_in_seconds(tmp_path):
    """400 000 particles of 256 px in one sparse 105 GB stack: only headers are read."""
    n, box = 400_000, 256
    stack = tmp_path / "huge.mrcs"
    write_stack(stack, 1, box)
    header = bytearray(stack.read_bytes()[:1024])
    header[8:12] = np.int32(n).tobytes()  # nz
    header[48:52] = np.int32(n).tobytes()  # mz
    with open(stack, "wb") as fh:
        fh.write(header)
        fh.truncate(1024 + n * box * box * 4)  # sparse: no disk used
    assert stack.stat().st_size > 100e9
    star = tmp_path / "huge.star"
    _big_star(star, n, "huge.mrcs")
    t0 = time.perf_counter()
    ps = read_particles(star)
    elapsed = time.perf_counter() - t0
    assert (ps.n_particles, ps.box) == (n, box)
    assert elapsed < 15, f"opening took {elapsed:.1f} s"
    # the last image can be read (zeros in a sparse file)
    assert ps.read_images([n - 1]).shape == (1, box, box)


def test_index_check_is_vectorised_over_many_stacks(tmp_path):
    """2 000 particles in 200 stacks: every index checked against its own stack."""
    names = []
    for s in range(200):
        write_stack(tmp_path / f"m{s:03d}.mrcs", 10, 4, seed=s)
        names += image_names(f"m{s:03d}.mrcs", range(10))
    block = relion30_block(len(names))
    block["rlnImageName"] = names
    block.loc[1234, "rlnImageName"] = "000011@m123.mrcs"
    star = write_star(tmp_path / "p.star", {"": block})
    with pytest.raises(ParticleFileError) as err:
        read_particles(star)
    assert err.value.row == 1234 and "m123.mrcs" in str(err.value)
    block.loc[1234, "rlnImageName"] = "000005@m123.mrcs"
    ps = read_particles(write_star(tmp_path / "p.star", {"": block}))
    assert ps.n_particles == 2000 and len(ps.images.stacks) == 200
    assert os.path.basename(str(ps.images.stacks[123])) == "m123.mrcs"


def test_ctf_columns_helper_is_used_consistently():
    cols = ctf_columns(4)
    assert set(cols) == {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"}
    assert (cols["rlnDefocusU"] >= cols["rlnDefocusV"]).all()


def test_starfile_reads_what_the_fixtures_write(tmp_path):
    star, blocks, _ = make_relion31(tmp_path)
    back = starfile.read(star, always_dict=True)
    assert set(back) == {"optics", "particles"}


def test_relion31_optics_without_defocus_columns_is_no_ctf(tmp_path):
    """Fault 2: every RELION 3.1 optics table has voltage, Cs and amplitude contrast; without
    defocus columns the particles simply have no CTF (they used to be refused)."""
    write_stack(tmp_path / "stack.mrcs", 6, 16)
    blocks = relion31_blocks(6)
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    )
    assert {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"} <= set(
        blocks["optics"].columns
    )
    ps = read_particles(write_star(tmp_path / "p.star", blocks))
    assert not ps.has_ctf and ps.n_particles == 6
    np.testing.assert_allclose(ps.pixel_size_A, 1.5)


def test_a_repeated_column_is_a_clear_error(tmp_path):
    """Fault 5: a STAR table naming one column twice is refused with the column's name."""
    star, _, _ = make_relion31(tmp_path)
    text = star.read_text().replace("_rlnMicrographName #4", "_rlnDefocusU #4")
    star.write_text(text)
    with pytest.raises(ParticleFileError, match="column rlnDefocusU appears twice") as err:
        read_particles(star)
    assert (err.value.path, err.value.column) == (star, "rlnDefocusU")


def test_image_names_with_spaces_quoted_as_relion_writes_them(tmp_path):
    """Fault 3 (reading): a quoted ``"000001@my stack.mrcs"`` names a stack with a space."""
    images = write_stack(tmp_path / "my stack.mrcs", 4, 16)
    blocks = relion31_blocks(4, stack="my stack.mrcs")
    star = tmp_path / "p.star"
    star.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n_rlnImageSize #3\n"
        "1 1.5 16\n\ndata_particles\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n"
        + "".join(f'"{name}" 1\n' for name in blocks["particles"]["rlnImageName"])
    )
    ps = read_particles(star)
    assert ps.metadata["rlnImageName"].iloc[0] == "000001@my stack.mrcs"
    np.testing.assert_array_equal(ps.read_images([3, 0]), images[[3, 0]])
