"""Every real particle file under ../shared/data, checked against numbers read from the files.

Expected values were read by eye from the files (head of each STAR; ``np.load``
of each ``.cs``), not computed by the code under test.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.readers import read_particles

RP = "real_particles"

#: (file, n, box, {group: Å}, first-row (defocusU Å, defocusV Å, angle °, kV, Cs mm, AC))
PARTICLE_FILES = [
    (
        f"{RP}/cryodrgn_relion31/relion31.star",
        5,
        256,
        {1: 2.806},
        (13108.082418, 12845.582418, -160.39, 300, 0.01, 0.1),
    ),
    (  # particles block first, optics block after it
        f"{RP}/cryodrgn_relion31/relion31.v2.star",
        5,
        256,
        {1: 2.806},
        (13108.082418, 12845.582418, -160.39, 300, 0.01, 0.1),
    ),
    (
        f"{RP}/aspire_sample/sample_particles_relion31.star",
        17,
        200,
        {1: 1.4, 2: 1.4},
        (21186.804688, 21363.109375, 7.476096, 300, 2.7, 0.1),
    ),
    (  # RELION 3.0: 5 µm detector pixel at 37369.207031x
        f"{RP}/aspire_sample/sample_particles_relion30.star",
        17,
        200,
        {1: 5e4 / 37369.207031, 2: 5e4 / 37369.207031},
        (21186.804688, 21363.109375, 7.476096, 300, 2.7, 0.1),
    ),
    (  # RELION 1.x-style data_ block, images in a .mrc
        f"{RP}/cryodrgn_empiar10076/empiar_10076_7.star",
        7,
        320,
        {1: 5e4 / 38168},
        (15301.1, 14916.4, 5.28, 300, 2.7, 0.07),
    ),
    (
        f"{RP}/cryodrgn_sta_ribosome_tilts/sta_testing_bin8.star",
        219,
        64,
        {1: 1.96},
        (20061.7, 19560.8, 12.3, 300, 2.7, 0.07),
    ),
    (  # cryoSPARC: df_angle_rad 0.09215339 rad = 5.28 deg
        f"{RP}/cryodrgn_empiar10076/empiar_10076_7.cs",
        7,
        320,
        {1: 1.3099979},
        (15301.1, 14916.4, 5.28, 300, 2.7, 0.07),
    ),
]


@pytest.mark.parametrize(
    ("name", "n", "box", "apix", "ctf0"), PARTICLE_FILES, ids=[p[0] for p in PARTICLE_FILES]
)
def test_real_particle_files(shared_data, name, n, box, apix, ctf0):
    ps = read_particles(shared_data / name)
    assert (ps.n_particles, ps.box) == (n, box)
    got = ps.pixel_size_by_optics_group
    assert set(got) == set(apix)
    for g, a in apix.items():
        assert got[g] == pytest.approx(a, rel=1e-6)
    c = ps.ctf
    first = (
        c.defocus_u_A[0],
        c.defocus_v_A[0],
        c.astigmatism_angle_deg[0],
        c.voltage_kV[0],
        c.cs_mm[0],
        c.amplitude_contrast[0],
    )
    np.testing.assert_allclose(first, ctf0, rtol=1e-6, atol=1e-4)
    images = ps.read_images(np.arange(n))
    assert images.shape == (n, box, box) and images.dtype == np.float32
    assert np.isfinite(images).all()
    assert images.std(axis=(1, 2)).min() > 0  # real images, not empty reads


def test_relion31_second_optics_group_has_its_own_voltage(shared_data):
    ps = read_particles(shared_data / RP / "aspire_sample/sample_particles_relion31.star")
    np.testing.assert_array_equal(ps.optics_group, [1] * 8 + [2] * 9)
    np.testing.assert_allclose(ps.ctf.voltage_kV, [300] * 8 + [200] * 9)


def test_star_and_cs_of_the_same_particles_agree(shared_data):
    star = read_particles(shared_data / RP / "cryodrgn_empiar10076/empiar_10076_7.star")
    cs = read_particles(shared_data / RP / "cryodrgn_empiar10076/empiar_10076_7.cs")
    np.testing.assert_array_equal(star.read_images(np.arange(7)), cs.read_images(np.arange(7)))
    np.testing.assert_allclose(star.ctf.defocus_u_A, cs.ctf.defocus_u_A, rtol=1e-6)
    np.testing.assert_allclose(
        star.ctf.astigmatism_angle_deg, cs.ctf.astigmatism_angle_deg, atol=1e-4
    )


def test_star_images_are_the_stack_images(shared_data):
    ps = read_particles(shared_data / RP / "cryodrgn_relion31/relion31.star")
    stack = shared_data / RP / "cryodrgn_relion31/relion31.mrcs"
    with pytest.warns(RuntimeWarning), mrcfile.open(stack, permissive=True) as m:  # odd map ID
        np.testing.assert_array_equal(ps.read_images([3, 1]), m.data[[3, 1]])


def test_star_referencing_an_absent_stack(shared_data):
    star = shared_data / RP / "aspire_sample/sample_relion_one_image.star"
    with pytest.raises(ParticleFileError, match="'sample_one_image.mrcs' not found") as err:
        read_particles(star)
    assert (err.value.path, err.value.row, err.value.column) == (star, 0, "rlnImageName")
    assert str(star.parent / "sample_one_image.mrcs") in str(err.value)


#: .cs files whose stacks are not shipped: (file, n, box, Å, df1 Å, angle °, kV)
ABSENT_STACK_CS = [
    ("cryosparc_J2_particles_exported.cs", 22, 300, 1.345, 16412.178, 49.36828, 300),
    ("cryosparc_P12_J24_001_particles.cs", 2019, 180, 2.95, 45591.37, -78.13109, 200),
]


@pytest.mark.parametrize(("name", "n", "box", "apix", "df1", "angle", "kv"), ABSENT_STACK_CS)
def test_cs_with_absent_stacks(shared_data, name, n, box, apix, df1, angle, kv):
    path = shared_data / "cryosparc_cs" / name
    with pytest.raises(ParticleFileError, match="not found; tried") as err:
        read_particles(path)
    assert (err.value.path, err.value.row, err.value.column) == (path, 0, "blob/path")
    # the metadata itself parses (metadata-only mode)
    ps = read_particles(path, check_stacks=False)
    assert (ps.n_particles, ps.box) == (n, box)
    assert ps.pixel_size_A[0] == pytest.approx(apix, rel=1e-6)
    assert ps.ctf.defocus_u_A[0] == pytest.approx(df1, rel=1e-6)
    assert ps.ctf.astigmatism_angle_deg[0] == pytest.approx(angle, abs=1e-4)
    assert ps.ctf.voltage_kV[0] == kv


def test_cs_without_blob_fields(shared_data):
    path = shared_data / "cryosparc_cs/cryosparc_tools_4k_dataset_empty_schema.cs"
    with pytest.raises(ParticleFileError, match="no blob/path") as err:
        read_particles(path)
    assert err.value.path == path


#: particle STAR files without their stacks: (file, n, optics groups, first defocusU Å)
METADATA_ONLY = [
    ("cryodrgn/relion31.6opticsgroups.star", 139, 6, 10352.805929),
    ("cryodrgn/relion5.star", 17, 1, 11949.06133),
    ("cryojax/test_starfile.star", 3, 1, 10061.054688),
    ("cryolike/relion_style_particles.star", 106, 1, 11798.491211),
    ("emtools_refine3d/run_it016_data.star", 4748, 1, 10967.940655),
    ("simspi/test.star", 452, 1, 11546.09375),
    ("relion1_betagal_tests/ap_s_c2d.star", 8915, 1, 33863.558594),
    ("relion1_betagal_tests/ref_it002_data.star", 9, 1, 33863.558594),
    ("aspire/sample_relion_symmetry_group_D4.star", 17, 2, 21186.804688),
    ("starfile_tests/optics_group_inter1965.star", 1, 1, 12588.289062),
    ("starfile_tests/one_loop.star", 16, 1, None),  # sub-tomograms, no CTF columns
]


@pytest.mark.parametrize(("name", "n", "n_groups", "df1"), METADATA_ONLY)
def test_particle_star_files_parse(shared_data, name, n, n_groups, df1):
    path = shared_data / "star_files" / name
    ps = read_particles(path, check_stacks=False)
    assert ps.n_particles == n
    assert len(ps.pixel_size_by_optics_group) == n_groups
    assert (ps.pixel_size_A > 0).all()
    if df1 is None:
        assert ps.ctf is None
    else:
        assert ps.ctf.defocus_u_A[0] == pytest.approx(df1)
    # with stack checks on, the absent stacks are named
    with pytest.raises(ParticleFileError, match="not found; tried"):
        read_particles(path)


def test_six_optics_groups(shared_data):
    ps = read_particles(
        shared_data / "star_files/cryodrgn/relion31.6opticsgroups.star", check_stacks=False
    )
    assert ps.pixel_size_by_optics_group == {1: 1.25, 2: 1.24, 3: 1.25, 4: 1.25, 5: 1.24, 6: 1.25}
    assert ps.box == 196
    # optics group 4 has Cs 2.6 mm, the others 2.7
    cs = {int(g): float(ps.ctf.cs_mm[ps.optics_group == g][0]) for g in np.unique(ps.optics_group)}
    assert cs == {1: 2.7, 2: 2.7, 3: 2.7, 4: 2.6, 5: 2.7, 6: 2.7}


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", "rlnAmplitudeContrast"),
        ("aspire/sample_incomplete_ctf_params.star", "rlnVoltage"),
    ],
)
def test_particle_star_files_with_incomplete_ctf(shared_data, name, column):
    path = shared_data / "star_files" / name
    with pytest.raises(ParticleFileError, match=f"incomplete CTF.*not {column}") as err:
        read_particles(path, check_stacks=False)
    assert (err.value.path, err.value.column) == (path, column)


NOT_PARTICLES = [
    "aspire/sample_data_model.star",
    "cryolike/particle_data_relion2_EMPIAR-10028.star",  # coordinates, no rlnImageName
    "emtools_refine3d/run_it016_half1_model.star",
    "emtools_refine3d/run_it016_optimiser.star",
    "emtools_refine3d/run_it016_sampling.star",
    "relion1_betagal_tests/ref_it002_model.star",
    "relion1_betagal_tests/ref_it002_optimiser.star",
    "relion1_betagal_tests/ref_it002_sampling.star",
    "starfile_tests/basic_double_quote.star",
    "starfile_tests/basic_single_quote.star",
    "starfile_tests/default_pipeline.star",
    "starfile_tests/empty_loop.star",
    "starfile_tests/loop_double_quote.star",
    "starfile_tests/loop_single_quote.star",
    "starfile_tests/postprocess.star",
    "starfile_tests/relion_tutorial/run_it025_optimiser_2D.star",
    "starfile_tests/relion_tutorial/run_it025_optimiser_3D.star",
    "starfile_tests/relion_tutorial/run_it025_sampling_2D.star",
    "starfile_tests/relion_tutorial/run_it025_sampling_3D.star",
    "starfile_tests/two_basic_blocks.star",
    "starfile_tests/two_single_line_loop_blocks.star",
]


@pytest.mark.parametrize("name", NOT_PARTICLES)
def test_non_particle_star_files(shared_data, name):
    path = shared_data / "star_files" / name
    with pytest.raises(ParticleFileError, match="no particle block") as err:
        read_particles(path, check_stacks=False)
    assert err.value.path == path


@pytest.mark.parametrize(
    "name",
    [
        "starfile_tests/rln3.1_data_style.star",
        "starfile_tests/single_line_end_of_multiblock.star",
        "starfile_tests/single_line_middle_of_multiblock.star",
    ],
)
def test_star_files_with_several_particle_blocks(shared_data, name):
    path = shared_data / "star_files" / name
    with pytest.raises(ParticleFileError, match="several blocks have an rlnImageName"):
        read_particles(path, check_stacks=False)


def test_every_star_file_is_classified(shared_data):
    """No STAR file under star_files/ is left out of the lists above."""
    known = {m[0] for m in METADATA_ONLY} | set(NOT_PARTICLES)
    known |= {
        "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star",
        "aspire/sample_incomplete_ctf_params.star",
        "starfile_tests/rln3.1_data_style.star",
        "starfile_tests/single_line_end_of_multiblock.star",
        "starfile_tests/single_line_middle_of_multiblock.star",
    }
    found = {
        str(p.relative_to(shared_data / "star_files"))
        for p in (shared_data / "star_files").rglob("*.star")
    }
    assert found <= known, sorted(found - known)
