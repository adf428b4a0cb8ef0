"""The job configuration shared by the CLI, the Python API and the widgets.

Parameter names and defaults follow cryoSPARC's 2D classification (see
``docs/parameters.md``). Every field changes what the classifier computes;
:meth:`Class2DConfig.validate` refuses invalid values before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

#: maximum resolution in Å when ``max_res_A`` is unset (unless the data's Nyquist is coarser)
DEFAULT_MAX_RES_A = 6.0

CTFMode = Literal["full", "flip", "off"]
ShiftPrior = Literal["gaussian", "uniform"]
ClassPrior = Literal["learned", "uniform", "learned_then_uniform"]
StreamMode = Literal["full", "incremental"]


class ConfigError(ValueError):
    """An invalid job parameter; the message names the parameter and the reason."""


@dataclass(frozen=True)
class Class2DConfig:
    """All parameters of a 2D classification job (batch or streaming).

    Attributes
    ----------
    n_classes
        Number of 2D classes K.
    max_res_A
        Maximum resolution in Å: images are Fourier-cropped so their Nyquist
        is this resolution, and class averages hold nothing finer (``None``:
        6 Å, or the data's Nyquist limit when that is coarser, e.g. for binned
        particles).
    max_align_res_A
        Finest resolution in Å used for alignment and classification
        (``None``: same as ``max_res_A``; finer than ``max_res_A`` is clamped
        with a warning).
    min_align_res_A
        Coarsest resolution in Å used for alignment (``None``: off, all low
        frequencies except the origin are used).
    n_online_em_iterations
        Number of online-EM iterations, each on a fresh mini-batch.
    batch_size_per_class
        Mini-batch size per class: each online iteration sees
        ``batch_size_per_class * n_classes`` particles.
    n_final_full_iterations
        Full iterations over all particles after the online phase (3: on the
        simulated sets the third pass keeps views that one pass loses; each costs
        one pass over every particle, which dominates a job of millions).
    icuf
        Initial classification uncertainty factor: the noise variance of the
        class posteriors is inflated by this factor at the start and annealed to
        1 (pose posteriors use the measured noise throughout).
    annealing_start_iteration
        Online iteration (0-based) at which annealing starts.
    n_annealing_iterations
        Number of online iterations over which the factor goes from ``icuf`` to 1.
    white_noise
        Use one noise variance for all frequencies instead of one per ring.
    ctf_correction
        ``"full"`` (CTF in the likelihood and a Wiener filter), ``"flip"``
        (phase-flipping only: ``|CTF|`` weights, signs flipped) or ``"off"``
        (negative stain / no CTF; each class's half-set FRC is then taken as falling
        with frequency when its averages are filtered, see
        :func:`~napari_class2d.engine.reconstruct.falling_frc`).
    clamp_solvent
        Solve class averages under the constraint that density outside the
        mask is zero, instead of masking the plain Wiener average.
    particle_diameter_A
        Particle diameter in Å (``None``: 80 % of the box); sets the
        background for normalisation, the default mask and the angular step.
    mask_inner_diameter_A, mask_outer_diameter_A
        Soft circular mask applied to the class averages, in Å
        (``None``: inner = particle diameter, outer = inner + 20 %).
    mask_particles_with_zeros
        Multiply every particle by the soft circular mask (``mask_inner_diameter_A``
        to ``mask_outer_diameter_A``) before it is compared with the classes, so
        that neighbours, carbon and background texture outside the particle do not
        drive its alignment (RELION's "mask individual particles with zeros").
        Off: only a soft window at the box edge (0.85-0.99 of the box radius).
    mask_neighbours
        Also mask the neighbouring picks: each particle keeps the part of its box
        nearer its own pick than any other pick on the same micrograph, with a soft
        edge as wide as the circular mask's (the rest filled with the particles'
        round average), so that in a crowded field a neighbour
        inside the particle mask does not drive alignment. Uses the pick coordinates
        (RELION ``rlnMicrographName`` and ``rlnCoordinateX/Y``; cryoSPARC
        ``location/*``); particles without them are not affected.
    masks_follow_shifts
        Place the particle masks (circular and neighbour) around each particle's current
        centre, its pick moved by the shift the last iteration found, as RELION masks a
        particle after moving it by its offset, instead of at the pick (off). Needs
        ``shift_prior="gaussian"``, which holds the particles near their picks: without it
        the masks and shifts drift together (on the crowded EMPIAR-10017
        β-galactosidase picks the shifts ran to the search limit).
    mask_shift_limit_A
        With ``masks_follow_shifts``: the farthest, in Å, that a particle's masks move from
        its pick with its shift; a particle shifted farther has its masks this far from
        its pick in the shift's direction (the shift itself is not limited by it).
        ``None``: no limit (as far as ``max_shift_A``). Bounds the drift of masks and
        shifts together on crowded real particles (measured in docs/benchmarks.md,
        seventh session). Refused without ``masks_follow_shifts``.
    remove_fixed_pattern
        Subtract from every particle the part of its micrograph's mean particle image
        (all its boxes averaged as cut, unaligned) that is not rotationally symmetric
        (with a CTF: that the micrograph's CTF does not explain), shrunk by the noise
        of that mean, before the normalisation and the masks. Particles lie at random
        in-plane angles, so their unaligned mean is round; what is not round is fixed
        in the box's frame (a detector pattern, an illumination gradient, extraction
        artefacts), and classes would otherwise align on it. Uses
        ``rlnMicrographName`` (cryoSPARC ``location/micrograph_path``); micrographs
        with fewer than 30 particles, and particles without a micrograph, are not
        changed. On by default: on every simulated benchmark set it subtracts nothing
        (the particles are cached byte for byte as without it); on the real
        β-galactosidase and raw micrographs it removes what the classes aligned on.
    resolution_increment_px
        The search uses frequencies up to the current resolution of the classes
        (where their spectral signal-to-noise ratio still reaches 1) plus this many
        Fourier shells (RELION's ``--incr_size``), never beyond the maximum
        alignment resolution; it grows as the classes improve.
    recenter
        Re-centre class averages on their centre of mass every iteration.
    recenter_threshold
        Only pixels above ``threshold * max`` count for the centre of mass.
    recenter_binary
        Use the binary mask above threshold (not the density) as weights.
    force_max_over_poses
        Class log-likelihood at the best pose (on) or marginalised over poses (off).
    inplane_step_deg
        In-plane rotation step in degrees for the fine search (``None``: about
        one pixel of arc at the particle radius at the working box).
    max_shift_A
        Maximum shift searched in Å (``None``: 10 % of the box).
    shift_prior
        Prior on each particle's shift from its pick: ``"gaussian"`` (RELION's
        ``sigma_offset``: a Gaussian around the pick whose variance, the mean squared
        shift per axis, is learned from the particles' shifts each iteration, between one
        working pixel and ``(max_shift_A / 2)²``), or ``"uniform"`` (every shift within
        ``max_shift_A`` equally likely). ``masks_follow_shifts`` needs the Gaussian
        prior: without it masks and shifts drift together.
    class_prior
        Prior probability of each class in the particles' class posteriors:
        ``"learned"`` (RELION's ``pdf_class``: each class's share of the particles, learned
        each iteration, so a particle that fits several classes about equally goes to the
        larger one) or ``"uniform"`` (every class equally likely a priori, so a class is
        chosen by how well it fits, whatever its size: junk that fits a small junk class
        no worse than a large view class is no longer drawn into the view), or
        ``"learned_then_uniform"`` (the default: the learned shares while the classes
        form, in the online iterations and a stream's updates, so a small class such as
        a rare view's is not filled with junk while it forms; uniform in the final full
        iterations, which assign every particle for the output, so junk goes to the
        class it fits). The learned shares are always written (``rlnClassDistribution``)
        and decide which classes are empty and re-seeded.
    reseed_empty_classes
        Re-seed classes that empty out during the online phase.
    hard_classification_last
        One-hot class assignments in the last iteration.
    regularisation_factor
        RELION's T: weight of the data against the class's own signal prior.
    seed
        Random seed; the same seed and inputs give the same classes.
    device
        ``"auto"`` (first CUDA device if present, else CPU), ``"cpu"`` or ``"cuda:N"``.
    memory_budget_GB
        Memory the E-step may use at once, in GiB; chunks are sized to fit.
    start_after_n_particles
        Streaming: particles needed before the first iteration
        (``None``: one mini-batch, ``batch_size_per_class * n_classes``).
    full_iteration_every_n_new
        Streaming: new particles that trigger a full iteration after the online
        phase (``None``: ``batch_size_per_class * n_classes * 2``).
    stream_mode
        Streaming after the online phase: ``"full"`` (a full iteration over all
        particles seen) or ``"incremental"`` (E-step on the new particles only,
        a full pass every ``full_pass_every_n_updates`` updates).
    full_pass_every_n_updates
        Streaming, incremental mode: a full pass after this many incremental updates.
    """

    n_classes: int = 50
    max_res_A: float | None = None
    max_align_res_A: float | None = None
    min_align_res_A: float | None = None
    n_online_em_iterations: int = 24
    batch_size_per_class: int = 100
    n_final_full_iterations: int = 3
    icuf: float = 2.0
    annealing_start_iteration: int = 6
    n_annealing_iterations: int = 15
    white_noise: bool = False
    ctf_correction: CTFMode = "full"
    clamp_solvent: bool = False
    mask_particles_with_zeros: bool = True
    mask_neighbours: bool = True
    masks_follow_shifts: bool = False
    mask_shift_limit_A: float | None = None
    remove_fixed_pattern: bool = True
    resolution_increment_px: int = 10
    particle_diameter_A: float | None = None
    mask_inner_diameter_A: float | None = None
    mask_outer_diameter_A: float | None = None
    recenter: bool = True
    recenter_threshold: float = 0.2
    recenter_binary: bool = False
    force_max_over_poses: bool = True
    inplane_step_deg: float | None = None
    max_shift_A: float | None = None
    shift_prior: ShiftPrior = "gaussian"
    class_prior: ClassPrior = "learned_then_uniform"
    reseed_empty_classes: bool = True
    hard_classification_last: bool = False
    regularisation_factor: float = 2.0
    seed: int = 0
    device: str = "auto"
    memory_budget_GB: float = 2.0
    start_after_n_particles: int | None = None
    full_iteration_every_n_new: int | None = None
    stream_mode: StreamMode = "full"
    full_pass_every_n_updates: int = 5

    # -- derived values -------------------------------------------------------------
    @property
    def online_batch_size(self) -> int:
        """Particles per online-EM iteration (``batch_size_per_class * n_classes``)."""
        return self.batch_size_per_class * self.n_classes

    @property
    def warmup_particles(self) -> int:
        """Streaming: particles needed before the first iteration."""
        return self.start_after_n_particles or self.online_batch_size

    @property
    def full_iteration_trigger(self) -> int:
        """Streaming: new particles that trigger a full iteration."""
        return self.full_iteration_every_n_new or 2 * self.online_batch_size

    def annealing_factor(self, online_progress: float) -> float:
        """Noise inflation factor after ``online_progress`` online iterations.

        ``online_progress`` may be fractional (streaming advances it with the
        number of distinct particles seen). The factor is ``icuf`` until
        ``annealing_start_iteration``, then falls linearly to 1 over
        ``n_annealing_iterations``, and stays 1 afterwards.
        """
        start, n = self.annealing_start_iteration, self.n_annealing_iterations
        if online_progress <= start:
            return float(self.icuf)
        if n <= 0 or online_progress >= start + n:
            return 1.0
        frac = (online_progress - start) / n
        return float(self.icuf + (1.0 - self.icuf) * frac)

    def replace(self, **changes) -> Class2DConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Class2DConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    # -- validation -----------------------------------------------------------------
    def validate(self) -> Class2DConfig:
        """Check every value that can be checked without data; return self.

        Raises
        ------
        ConfigError
            Naming the parameter and why its value is refused.
        """

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        def positive_or_none(name: str) -> None:
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), name, "must be > 0 (or unset)")

        def one_of(name: str, choices: object) -> None:
            """The value must be one of the ``Literal`` type's values."""
            values = get_args(choices)
            listed = ", ".join(repr(v) for v in values[:-1]) + f" or {values[-1]!r}"
            need(getattr(self, name) in values, name, f"must be {listed}")

        need(isinstance(self.n_classes, int) and self.n_classes >= 1, "n_classes", "must be >= 1")
        for name in (
            "max_res_A",
            "max_align_res_A",
            "min_align_res_A",
            "particle_diameter_A",
            "mask_inner_diameter_A",
            "mask_outer_diameter_A",
            "inplane_step_deg",
        ):
            positive_or_none(name)
        need(self.max_shift_A is None or self.max_shift_A >= 0, "max_shift_A", "must be >= 0 Å")
        limit = self.mask_shift_limit_A
        need(
            limit is None or (math.isfinite(limit) and limit >= 0),
            "mask_shift_limit_A",
            "must be >= 0 Å (or unset)",
        )
        one_of("shift_prior", ShiftPrior)
        one_of("class_prior", ClassPrior)
        need(
            not self.masks_follow_shifts or self.shift_prior == "gaussian",
            "masks_follow_shifts",
            "needs shift_prior='gaussian' (with a uniform prior masks and shifts drift "
            "together to the search limit)",
        )
        need(
            limit is None or self.masks_follow_shifts,
            "mask_shift_limit_A",
            "has no effect unless masks_follow_shifts is on (the masks stay at the pick)",
        )
        if self.min_align_res_A is not None:
            max_res = self.max_res_A or DEFAULT_MAX_RES_A
            finest = self.max_align_res_A or max_res
            need(
                self.min_align_res_A > max(finest, max_res),
                "min_align_res_A",
                f"must be coarser (larger, in Å) than the maximum alignment resolution {finest} Å",
            )
        need(self.n_online_em_iterations >= 0, "n_online_em_iterations", "must be >= 0")
        need(self.batch_size_per_class >= 1, "batch_size_per_class", "must be >= 1")
        need(self.n_final_full_iterations >= 0, "n_final_full_iterations", "must be >= 0")
        need(
            self.n_online_em_iterations + self.n_final_full_iterations >= 1,
            "n_final_full_iterations",
            "the job needs at least one iteration (online or full)",
        )
        need(math.isfinite(self.icuf) and self.icuf >= 1, "icuf", "must be >= 1")
        need(self.annealing_start_iteration >= 0, "annealing_start_iteration", "must be >= 0")
        need(self.n_annealing_iterations >= 0, "n_annealing_iterations", "must be >= 0")
        one_of("ctf_correction", CTFMode)
        if self.mask_inner_diameter_A is not None and self.mask_outer_diameter_A is not None:
            need(
                self.mask_outer_diameter_A >= self.mask_inner_diameter_A,
                "mask_outer_diameter_A",
                "must be >= the inner diameter",
            )
        need(self.resolution_increment_px >= 1, "resolution_increment_px", "must be >= 1")
        need(0 < self.recenter_threshold < 1, "recenter_threshold", "must be in (0, 1)")
        need(self.regularisation_factor > 0, "regularisation_factor", "must be > 0")
        need(isinstance(self.seed, int), "seed", "must be an integer")
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be 'auto', 'cpu' or 'cuda[:N]'",
        )
        need(self.memory_budget_GB > 0, "memory_budget_GB", "must be > 0 GiB")
        need(
            self.start_after_n_particles is None or self.start_after_n_particles >= 1,
            "start_after_n_particles",
            "must be >= 1 (or unset)",
        )
        need(
            self.full_iteration_every_n_new is None or self.full_iteration_every_n_new >= 1,
            "full_iteration_every_n_new",
            "must be >= 1 (or unset)",
        )
        one_of("stream_mode", StreamMode)
        need(self.full_pass_every_n_updates >= 1, "full_pass_every_n_updates", "must be >= 1")
        return self

    def resolve(self, box: int, pixel_size_A: float) -> ResolvedParams:
        """Data-dependent values for particles of ``box`` pixels of ``pixel_size_A`` Å.

        Raises
        ------
        ConfigError
            When a value cannot be honoured for this data (e.g. a mask larger
            than the box, a maximum resolution finer than Nyquist).
        """
        self.validate()
        nyquist = 2.0 * pixel_size_A
        notes: list[str] = []
        max_res = self.max_res_A
        if max_res is None:
            max_res = DEFAULT_MAX_RES_A
            if max_res < nyquist - 1e-6:
                notes.append(
                    f"max_res_A: the default {DEFAULT_MAX_RES_A:g} Å is finer than the data's "
                    f"Nyquist limit {nyquist:.2f} Å (pixel {pixel_size_A:.3f} Å); using "
                    f"{nyquist:.2f} Å"
                )
                max_res = nyquist
        elif max_res < nyquist - 1e-6:
            raise ConfigError(
                f"max_res_A={max_res}: finer than the data's Nyquist limit "
                f"{nyquist:.2f} Å (pixel {pixel_size_A:.3f} Å)"
            )
        box_A = box * pixel_size_A
        working_box = min(box, 2 * math.ceil(box * pixel_size_A / max_res))
        working_box = max(working_box, 16) if box >= 16 else box
        working_pixel = box_A / working_box
        max_align = self.max_align_res_A or max_res
        if max_align < max_res:
            warnings.warn(
                f"max_align_res_A={max_align} Å is finer than max_res_A={max_res} Å; "
                f"clamped to {max_res} Å",
                stacklevel=2,
            )
            max_align = max_res
        if self.min_align_res_A is not None and self.min_align_res_A >= box_A:
            raise ConfigError(
                f"min_align_res_A={self.min_align_res_A}: "
                f"must be finer than the box ({box_A:.0f} Å)"
            )
        diameter = self.particle_diameter_A or 0.8 * box_A
        if diameter > box_A:
            raise ConfigError(
                f"particle_diameter_A={diameter}: larger than the box ({box_A:.0f} Å)"
            )
        inner = self.mask_inner_diameter_A or diameter
        outer = self.mask_outer_diameter_A or min(1.2 * inner, box_A)
        if inner > box_A:
            raise ConfigError(
                f"mask_inner_diameter_A={inner}: larger than the box ({box_A:.0f} Å)"
            )
        if outer < inner:
            raise ConfigError(
                f"mask_outer_diameter_A={outer}: smaller than the inner diameter {inner} Å"
            )
        radius_px = 0.5 * diameter / working_pixel
        step = self.inplane_step_deg or float(
            min(max(math.degrees(1.0 / max(radius_px, 1.0)), 1.0), 15.0)
        )
        max_shift = self.max_shift_A if self.max_shift_A is not None else 0.1 * box_A
        return ResolvedParams(
            box=box,
            pixel_size_A=pixel_size_A,
            working_box=working_box,
            working_pixel_size_A=working_pixel,
            max_align_res_A=max_align,
            min_align_res_A=self.min_align_res_A,
            particle_diameter_A=diameter,
            mask_inner_diameter_A=inner,
            mask_outer_diameter_A=outer,
            inplane_step_deg=step,
            max_shift_A=max_shift,
            mask_particles_with_zeros=self.mask_particles_with_zeros,
            mask_neighbours=self.mask_neighbours,
            masks_follow_shifts=self.masks_follow_shifts,
            mask_shift_limit_A=self.mask_shift_limit_A,
            shift_prior=self.shift_prior,
            remove_fixed_pattern=self.remove_fixed_pattern,
            max_res_A=max_res,
            notes=tuple(notes),
        )


@dataclass(frozen=True)
class ResolvedParams:
    """Values of a :class:`Class2DConfig` resolved for one data set (Å, pixels, degrees)."""

    box: int
    pixel_size_A: float
    working_box: int
    working_pixel_size_A: float
    max_align_res_A: float
    min_align_res_A: float | None
    particle_diameter_A: float
    mask_inner_diameter_A: float
    mask_outer_diameter_A: float
    inplane_step_deg: float
    max_shift_A: float
    mask_particles_with_zeros: bool = True
    mask_neighbours: bool = True
    masks_follow_shifts: bool = False
    #: how far (Å) the masks follow a shift from the pick (``None``: no limit)
    mask_shift_limit_A: float | None = None
    #: ``"gaussian"``: the learned Gaussian prior on the shifts; ``"uniform"``: none
    shift_prior: ShiftPrior = "gaussian"
    remove_fixed_pattern: bool = True
    #: the maximum resolution used (``max_res_A``, or its data-dependent default)
    max_res_A: float = DEFAULT_MAX_RES_A
    #: what :meth:`Class2DConfig.resolve` chose for the data, one line each
    notes: tuple[str, ...] = ()
