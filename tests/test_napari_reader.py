"""The npe2 manifest and the lazy readers (no viewer needed)."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import mrcfile
import npe2
import numpy as np
import pandas as pd
import pytest
import starfile

from napari_class2d import _reader
from napari_class2d._reader import META_PARTICLES, META_SOURCE, get_reader

MANIFEST = Path(_reader.__file__).with_name("napari.yaml")


def test_manifest_validates_and_imports():
    pm = npe2.PluginManifest.from_file(MANIFEST)
    assert pm.name == "napari-class2d" and pm.display_name == "2D Classification"
    pm.validate_imports()  # every python_name resolves
    names = {w.display_name for w in pm.contributions.widgets}
    assert names == {"2D Classification", "Streaming 2D Classification", "Class Selection"}
    patterns = {p for r in pm.contributions.readers for p in r.filename_patterns}
    assert patterns == {"*.mrcs", "*.mrc", "*.star", "*.cs"}
    assert len(pm.contributions.sample_data) == 1


def _write_stack(path, data, apix=1.5):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = apix


def test_stack_reader_lazy_on_big_stack(tmp_path):
    """A 4 GiB stack opens at once and reading one image reads only that image."""
    path = tmp_path / "big.mrcs"
    n, box = 16384, 256  # 4 GiB of float32, a sparse file: never written
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.data[5] = 7.0
        mrc.voxel_size = 1.1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    reader = get_reader(str(path))
    (data, meta, kind) = reader(str(path))[0]
    elapsed = time.perf_counter() - t0
    assert kind == "image" and data.shape == (n, box, box)
    assert not isinstance(data, np.ndarray)  # lazy (dask), not loaded
    assert elapsed < 5.0
    np.testing.assert_array_equal(np.asarray(data[5]), 7.0)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (rss_after - rss_before) < 512 * 1024  # far less than the 4 GiB file
    assert meta["metadata"][_reader.META_PIXEL_SIZE] == pytest.approx(1.1)
    assert meta["metadata"][META_SOURCE] == str(path)
    lo, hi = meta["contrast_limits"]
    assert hi > lo


def test_particle_star_reader_gives_lazy_images_and_particles(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(150, 24, 24)).astype(np.float32)
    _write_stack(tmp_path / "parts.mrcs", images)
    df = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@parts.mrcs" for i in range(150)],
            "rlnDefocusU": 10000.0,
            "rlnDefocusV": 10000.0,
            "rlnDefocusAngle": 0.0,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnDetectorPixelSize": 1.5,
            "rlnMagnification": 10000.0,
        }
    )
    starfile.write(df, tmp_path / "parts.star")
    reader = get_reader(str(tmp_path / "parts.star"))
    assert reader is not None
    data, meta, kind = reader(str(tmp_path / "parts.star"))[0]
    assert kind == "image" and data.shape == (150, 24, 24)
    assert not isinstance(data, np.ndarray)
    np.testing.assert_allclose(np.asarray(data[[3, 140]]), images[[3, 140]])
    np.testing.assert_allclose(np.asarray(data[70:130]), images[70:130])
    particles = meta["metadata"][META_PARTICLES]
    assert particles.n_particles == 150 and particles.box == 24
    assert meta["metadata"][META_SOURCE] == str(tmp_path / "parts.star")


def test_reader_refuses_non_particle_files(tmp_path):
    model = tmp_path / "run_model.star"
    starfile.write(
        {
            "model_general": pd.DataFrame({"rlnNrClasses": [2]}),
            "model_classes": pd.DataFrame(
                {"rlnReferenceImage": ["000001@run_classes.mrcs", "000002@run_classes.mrcs"]}
            ),
        },
        model,
    )
    assert get_reader(str(model)) is None
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader([str(model), str(model)]) is None
    np.save(tmp_path / "other.npy", np.zeros(3, dtype=[("uid", "<u8")]))
    (tmp_path / "other.npy").rename(tmp_path / "other.cs")
    assert get_reader(str(tmp_path / "other.cs")) is None


def test_reader_on_real_relion_and_cryosparc_files(shared_data):
    for rel in (
        "real_particles/cryodrgn_relion31/relion31.star",
        "real_particles/aspire_sample/sample_particles_relion30.star",
    ):
        path = shared_data / rel
        reader = get_reader(str(path))
        assert reader is not None, rel
        data, meta, _ = reader(str(path))[0]
        particles = meta["metadata"][META_PARTICLES]
        assert data.shape == (particles.n_particles, particles.box, particles.box)
        first = np.asarray(data[0])
        np.testing.assert_allclose(first, particles.read_images([0])[0])
    assert (
        get_reader(str(shared_data / "star_files/relion1_betagal_tests/ref_it002_model.star"))
        is None
    )
