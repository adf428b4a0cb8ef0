"""Qt-free particle I/O: RELION STAR, cryoSPARC .cs, memory-mapped .mrcs.

Main entry points::

    from napari_class2d.io import read_particles, write_particle_star
    particles = read_particles("Class2D/job008/run_it025_data.star")
    images = particles.read_images([0, 1, 2])  # float32 (3, box, box)
"""

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.model import (
    ClassAverages,
    ClassModel,
    read_class_averages,
    read_model_star,
)
from napari_class2d.io.mrc import open_stack, read_stack_header
from napari_class2d.io.particles import CTFParams, ImageSource, ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.stack import read_mrcs_particles
from napari_class2d.io.writers import (
    atomic_write,
    write_class_averages,
    write_model_star,
    write_particle_star,
)

__all__ = [
    "CTFParams",
    "ClassAverages",
    "ClassModel",
    "ImageSource",
    "ParticleFileError",
    "ParticleSet",
    "atomic_write",
    "open_stack",
    "read_class_averages",
    "read_model_star",
    "read_mrcs_particles",
    "read_particles",
    "read_stack_header",
    "write_class_averages",
    "write_model_star",
    "write_particle_star",
]
