"""MRC stacks: memory-mapped reads and every way a stack can be unusable."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from io_fixtures import write_stack
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import open_stack, read_stack_header
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.stack import read_mrcs_particles


def test_open_stack_is_a_lazy_view_with_the_file_values(tmp_path):
    data = write_stack(tmp_path / "a.mrcs", 5, 12)
    stack = open_stack(tmp_path / "a.mrcs")
    assert stack.shape == (5, 12, 12)
    assert isinstance(stack, np.memmap)
    np.testing.assert_array_equal(stack[3], data[3])


def test_missing_stack_names_the_file(tmp_path):
    with pytest.raises(ParticleFileError, match="not found") as err:
        open_stack(tmp_path / "nope.mrcs")
    assert err.value.path == tmp_path / "nope.mrcs"


def test_truncated_stack_is_refused_with_sizes(tmp_path):
    path = tmp_path / "cut.mrcs"
    write_stack(path, 4, 16)
    full = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(full - 100)
    with pytest.raises(ParticleFileError, match="truncated") as err:
        open_stack(path)
    assert str(path) in str(err.value)
    assert str(full - 100) in str(err.value)
    assert not read_stack_header(path).is_complete


def test_file_shorter_than_a_header_is_refused(tmp_path):
    path = tmp_path / "tiny.mrcs"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ParticleFileError, match="1024-byte") as err:
        open_stack(path)
    assert err.value.path == path


def test_non_square_images_are_refused(tmp_path):
    path = tmp_path / "rect.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((3, 10, 12), np.float32))
    with pytest.raises(ParticleFileError, match="12x10 pixels; expected square") as err:
        open_stack(path)
    assert err.value.path == path


def test_volume_mrc_is_refused_as_particles_but_mrcs_is_a_stack(tmp_path):
    write_stack(tmp_path / "map.mrc", 8, 8, volume=True)
    with pytest.raises(ParticleFileError, match="3D map") as err:
        read_particles(tmp_path / "map.mrc")
    assert err.value.path == tmp_path / "map.mrc"
    # explicitly a stack: accepted
    ps = read_mrcs_particles(tmp_path / "map.mrc", as_stack=True)
    assert ps.n_particles == 8
    # a .mrcs is always a stack, whatever its space group says
    write_stack(tmp_path / "vol_header.mrcs", 8, 8, volume=True)
    assert read_particles(tmp_path / "vol_header.mrcs").n_particles == 8
    # a .mrc with the image-stack space group is a stack
    write_stack(tmp_path / "stack.mrc", 8, 8)
    assert read_particles(tmp_path / "stack.mrc").n_particles == 8


def test_unsupported_mode_is_refused(tmp_path):
    path = tmp_path / "complex.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 8, 8), np.complex64))
    with pytest.raises(ParticleFileError, match="complex"):
        open_stack(path)


def test_mrcs_pixel_size_from_header_or_user(tmp_path):
    write_stack(tmp_path / "a.mrcs", 4, 8, voxel_size=2.25)
    ps = read_particles(tmp_path / "a.mrcs")
    assert ps.source_format == "mrcs"
    assert ps.ctf is None
    assert ps.box == 8
    np.testing.assert_allclose(ps.pixel_size_A, 2.25)
    assert list(ps.metadata["rlnImageName"]) == [f"{i:06d}@a.mrcs" for i in range(1, 5)]
    # the user's value wins over the header (headers often hold a placeholder)
    override = read_particles(tmp_path / "a.mrcs", pixel_size_A=1.1)
    np.testing.assert_allclose(override.pixel_size_A, 1.1)


def test_mrcs_without_pixel_size_needs_one(tmp_path):
    write_stack(tmp_path / "a.mrcs", 4, 8, voxel_size=0.0)
    with pytest.raises(ParticleFileError, match="no pixel size") as err:
        read_particles(tmp_path / "a.mrcs")
    assert err.value.path == tmp_path / "a.mrcs"
    assert read_particles(tmp_path / "a.mrcs", pixel_size_A=3.0).pixel_size_A[0] == 3.0


def test_nonfinite_pixels_are_caught_in_the_chunk_that_reads_them(tmp_path):
    data = np.random.default_rng(0).normal(size=(10, 8, 8)).astype(np.float32)
    data[7, 3, 4] = np.nan
    data[9, 0, 0] = np.inf
    write_stack(tmp_path / "bad.mrcs", data=data)
    ps = read_particles(tmp_path / "bad.mrcs")  # opening reads only the header
    np.testing.assert_array_equal(ps.read_images([0, 1, 6]), data[[0, 1, 6]])
    chunks = ps.chunks(4)
    idx, first = next(chunks)
    np.testing.assert_array_equal(first, data[:4])
    with pytest.raises(ParticleFileError, match="NaN or infinite") as err:
        next(chunks)  # particles 4-7: image 7 is bad
    assert err.value.path.name == "bad.mrcs"
    assert "image 7 " in str(err.value)
    with pytest.raises(ParticleFileError, match="image 9 "):
        ps.read_images([9])


def test_integer_modes_read_as_float32(tmp_path):
    data = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    write_stack(tmp_path / "int.mrcs", data=data)
    out = read_particles(tmp_path / "int.mrcs").read_images([1, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data[[1, 0]].astype(np.float32))


def test_many_stacks_do_not_exhaust_file_descriptors(tmp_path):
    sets = []
    for i in range(12):
        write_stack(tmp_path / f"s{i}.mrcs", 2, 4, seed=i)
        sets.append(read_particles(tmp_path / f"s{i}.mrcs"))
    ps = ParticleSet.concat(sets)
    ps.images.max_open_stacks = 3
    images = ps.read_images(np.arange(24)[::-1])
    assert len(ps.images._mmaps) <= 3
    expected = np.concatenate([s.read_images([0, 1]) for s in sets])[::-1]
    np.testing.assert_array_equal(images, expected)


def test_shared_mrcs_stacks(shared_data):
    ps = read_particles(shared_data / "real_particles/cryodrgn_relion31/relion31.mrcs")
    assert (ps.n_particles, ps.box) == (5, 256)
    relion31 = shared_data / "real_particles/cryodrgn_relion31/relion31.mrcs"
    with pytest.warns(RuntimeWarning), mrcfile.open(relion31, permissive=True) as mrc:
        # its map ID is not "MAP ": mrcfile warns, our reader accepts it
        expected = np.asarray(mrc.data[[4, 0]], dtype=np.float32)
    np.testing.assert_array_equal(ps.read_images([4, 0]), expected)
    # voxel size 0 in this header: the pixel size must be given
    sample = shared_data / "real_particles/aspire_sample/sample.mrcs"
    with pytest.raises(ParticleFileError, match="no pixel size"):
        read_particles(sample)
    ps = read_particles(sample, pixel_size_A=1.338)
    assert (ps.n_particles, ps.box) == (17, 200)
    assert np.isfinite(ps.read_images(np.arange(17))).all()
    # a 7-image .mrc whose header says "volume": refused as a bare file ...
    with pytest.raises(ParticleFileError, match="3D map"):
        read_particles(shared_data / "real_particles/cryodrgn_empiar10076/empiar_10076_7.mrc")


def test_shared_maps_are_refused_as_particles(shared_data):
    for name in ("cryodrgn_hand-vol_synthetic.mrc", "cryojax_3j9g_potential_ps4_4_simulated.mrc"):
        with pytest.raises(ParticleFileError, match="3D map"):
            read_particles(shared_data / "maps" / name)


def test_header_mode_disagreeing_with_the_file_size_is_refused(tmp_path):
    """Fault 4: a stack whose header says int16 but that holds float32 pixels is refused,
    naming the file and both sizes (it used to be read as garbage)."""
    path = tmp_path / "liar.mrcs"
    write_stack(path, 5, 16)  # float32: 1024 + 5 * 16 * 16 * 4 bytes
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.header.mode = 1  # int16
    size = path.stat().st_size
    with pytest.raises(ParticleFileError, match="mode 1 \\(int16\\)") as err:
        open_stack(path)
    message = str(err.value)
    assert str(path) in message
    assert f"{1024 + 5 * 16 * 16 * 2} bytes" in message and f"{size} bytes" in message
    assert "mode 2 (float32)" in message  # what the size fits
    with pytest.raises(ParticleFileError, match="does not describe the data"):
        read_particles(path, pixel_size_A=1.0)
