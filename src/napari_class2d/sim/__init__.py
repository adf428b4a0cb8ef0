"""Ground-truth particle simulation and classification scoring.

Importing this package is cheap; the submodules pull in torch:

- :mod:`napari_class2d.sim.simulate`: :func:`simulate_dataset`, :func:`stream_into`
- :mod:`napari_class2d.sim.score`: :func:`score_classification`
- :mod:`napari_class2d.sim.transforms`: pose conventions, :func:`rotate_and_shift`
- :mod:`napari_class2d.sim.phantom`, :mod:`~napari_class2d.sim.maps`,
  :mod:`~napari_class2d.sim.project`: what is projected and how
"""
