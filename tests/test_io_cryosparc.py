"""cryoSPARC .cs particle files: units, path resolution and errors."""

from __future__ import annotations

import numpy as np
import pytest

from io_fixtures import cs_fields, write_cs, write_stack
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.readers import read_particles


def test_cs_values_in_relion_units_and_images(tmp_path):
    images = write_stack(tmp_path / "stack.mrcs", 6, 16)
    fields = cs_fields(6, ">J3/extract/stack.mrcs")
    cs = write_cs(tmp_path / "P1_J5_particles.cs", fields)
    ps = read_particles(cs)  # not under J3/extract: found by its bare name beside the .cs
    assert ps.source_format == "cryosparc"
    assert (ps.n_particles, ps.box) == (6, 16)
    np.testing.assert_allclose(ps.pixel_size_A, 1.25)
    np.testing.assert_allclose(ps.ctf.defocus_u_A, fields["ctf/df1_A"])
    np.testing.assert_allclose(ps.ctf.defocus_v_A, fields["ctf/df2_A"])
    np.testing.assert_allclose(
        ps.ctf.astigmatism_angle_deg, np.degrees(fields["ctf/df_angle_rad"].astype(np.float64))
    )
    np.testing.assert_allclose(ps.ctf.phase_shift_deg, 90.0, rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.bfactor_A2, 0.0)  # absent: default
    np.testing.assert_allclose(ps.ctf.voltage_kV, 300)
    np.testing.assert_array_equal(ps.read_images([4, 1]), images[[4, 1]])
    # metadata keeps the .cs field names, bytes decoded, vectors split per component
    assert ps.metadata["blob/path"].iloc[0] == ">J3/extract/stack.mrcs"
    assert list(ps.metadata["alignments2D/class"]) == [0, 1, 2, 0, 1, 2]
    np.testing.assert_allclose(
        ps.metadata["alignments2D/shift/1"], fields["alignments2D/shift"][:, 1]
    )


def test_cs_paths_relative_to_cs_folder_then_project(tmp_path):
    project = tmp_path / "CS-project"
    (project / "J3" / "extract").mkdir(parents=True)
    (project / "J7").mkdir()
    data = write_stack(project / "J3" / "extract" / "mic.mrcs", 4, 8)
    cs = write_cs(project / "J7" / "J7_particles.cs", cs_fields(4, ">J3/extract/mic.mrcs", box=8))
    with pytest.raises(ParticleFileError, match="not found") as err:
        read_particles(cs)
    assert (err.value.row, err.value.column) == (0, "blob/path")
    assert str(project / "J7" / "J3" / "extract" / "mic.mrcs") in str(err.value)
    assert str(project / "J7" / "mic.mrcs") in str(err.value)
    ps = read_particles(cs, project_dir=project)
    np.testing.assert_array_equal(ps.read_images([3]), data[[3]])
    # a .cs exported into the project folder itself resolves without help
    cs2 = write_cs(project / "exported.cs", cs_fields(4, "J3/extract/mic.mrcs", box=8))
    assert read_particles(cs2).n_particles == 4


def test_cs_without_blob_path(tmp_path):
    fields = cs_fields(3, "x.mrcs")
    del fields["blob/path"]
    cs = write_cs(tmp_path / "noblob.cs", fields)
    with pytest.raises(ParticleFileError, match="no blob/path") as err:
        read_particles(cs)
    assert err.value.path == cs and err.value.column == "blob/path"


def test_cs_partial_ctf_and_nonfinite_values(tmp_path):
    write_stack(tmp_path / "s.mrcs", 4, 16)
    fields = cs_fields(4, "s.mrcs")
    del fields["ctf/cs_mm"]
    cs = write_cs(tmp_path / "partial.cs", fields)
    with pytest.raises(ParticleFileError, match="not ctf/cs_mm") as err:
        read_particles(cs)
    assert err.value.column == "ctf/cs_mm"
    fields = cs_fields(4, "s.mrcs")
    fields["ctf/df2_A"][2] = np.nan
    cs = write_cs(tmp_path / "nan.cs", fields)
    with pytest.raises(ParticleFileError, match="not a finite number") as err:
        read_particles(cs)
    assert (err.value.path, err.value.row, err.value.column) == (cs, 2, "ctf/df2_A")


def test_cs_without_ctf_fields_has_no_ctf(tmp_path):
    write_stack(tmp_path / "s.mrcs", 4, 16)
    fields = {k: v for k, v in cs_fields(4, "s.mrcs").items() if not k.startswith("ctf/")}
    ps = read_particles(write_cs(tmp_path / "noctf.cs", fields))
    assert ps.ctf is None


def test_cs_index_beyond_stack_and_box_mismatch(tmp_path):
    write_stack(tmp_path / "s.mrcs", 4, 16)
    fields = cs_fields(4, "s.mrcs")
    fields["blob/idx"][3] = 4
    cs = write_cs(tmp_path / "beyond.cs", fields)
    with pytest.raises(ParticleFileError, match="image 4 is beyond the end of stack") as err:
        read_particles(cs)
    assert (err.value.row, err.value.column) == (3, "blob/idx")
    fields = cs_fields(4, "s.mrcs", box=32)
    cs = write_cs(tmp_path / "box.cs", fields)
    with pytest.raises(ParticleFileError, match="blob/shape says 32 px"):
        read_particles(cs)


def test_cs_pixel_size_fallback(tmp_path):
    write_stack(tmp_path / "s.mrcs", 4, 16)
    fields = cs_fields(4, "s.mrcs")
    fields["blob/psize_A"][:] = 0
    cs = write_cs(tmp_path / "nopix.cs", fields)
    with pytest.raises(ParticleFileError, match="no pixel size"):
        read_particles(cs)
    np.testing.assert_allclose(read_particles(cs, pixel_size_A=0.9).pixel_size_A, 0.9)


def test_not_a_cs_file(tmp_path):
    bad = tmp_path / "bad.cs"
    bad.write_text("hello")
    with pytest.raises(ParticleFileError, match="not a cryoSPARC .cs file") as err:
        read_particles(bad)
    assert err.value.path == bad


def test_fractional_image_index_is_refused(tmp_path):
    """Fault 11: ``blob/idx`` 1.5 is an error naming the row, not image 1."""
    write_stack(tmp_path / "stack.mrcs", 4, 16)
    fields = cs_fields(4, "stack.mrcs")
    fields["blob/idx"] = np.array([0.0, 1.5, 2.0, 3.0])
    cs = write_cs(tmp_path / "frac.cs", fields)
    with pytest.raises(ParticleFileError, match="1.5 is not a whole number") as err:
        read_particles(cs)
    assert (err.value.row, err.value.column) == (1, "blob/idx")
    fields["blob/idx"] = np.array([0.0, 1.0, 2.0, 3.0])  # whole numbers stored as floats: fine
    assert read_particles(write_cs(tmp_path / "whole.cs", fields)).n_particles == 4


def test_pickled_or_foreign_file_is_not_a_cs_file(tmp_path):
    """Fault 11: a pickle or any other file is "not a cryoSPARC .cs file", without numpy's
    hint to allow pickles (which would run code from the file)."""
    pickled = tmp_path / "objects.cs"
    with open(pickled, "wb") as fh:
        np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    star = tmp_path / "particles.cs"
    star.write_text("data_particles\nloop_\n_rlnImageName #1\n")
    for path in (pickled, star):
        with pytest.raises(ParticleFileError, match="not a cryoSPARC .cs file") as err:
            read_particles(path)
        assert "allow_pickle" not in str(err.value) and err.value.path == path
