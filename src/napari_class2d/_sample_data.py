"""npe2 sample data: a small simulated particle set, made on the fly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from napari_class2d._reader import read_particle_file
from napari_class2d.sim.simulate import simulate_dataset

#: size of the sample: small enough to simulate in seconds, big enough to classify
SAMPLE_PARTICLES = 600
SAMPLE_BOX = 64


def make_sample_particles(out_dir: str | Path | None = None) -> list[tuple]:
    """Simulate a small particle set into a temporary folder and open it.

    The files stay on disk (the layer reads its images lazily from them); the
    layer metadata names the ``particles.star`` so a job can be run on it.
    """
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="napari-class2d-sample-")
    out_dir = Path(out_dir)
    sim = simulate_dataset(out_dir, n_particles=SAMPLE_PARTICLES, box=SAMPLE_BOX)
    layers = read_particle_file(str(sim.particles_star))
    for _data, meta, _kind in layers:
        meta["name"] = "simulated particles"
    return layers
