"""Classifier options shared by ``classify``, ``stream`` and ``demo``.

One flag per :class:`~napari_class2d.engine.config.Class2DConfig` field users
set; the names are the ones external scripts use (keep them).
"""

from __future__ import annotations

import argparse

from napari_class2d.engine.config import Class2DConfig

_D = Class2DConfig()


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add every classifier option to ``parser``."""
    g = parser.add_argument_group("classification")
    g.add_argument("--classes", type=int, default=_D.n_classes, help="number of 2D classes")
    g.add_argument(
        "--max-res",
        type=float,
        default=_D.max_res_A,
        help="maximum resolution (Å): images are cropped to this Nyquist",
    )
    g.add_argument(
        "--max-align-res",
        type=float,
        default=None,
        help="finest resolution used for alignment (Å; default: --max-res)",
    )
    g.add_argument(
        "--min-align-res",
        type=float,
        default=None,
        help="coarsest resolution used for alignment (Å; default: off)",
    )
    g.add_argument(
        "--online-iters", type=int, default=_D.n_online_em_iterations, help="online-EM iterations"
    )
    g.add_argument(
        "--batch-per-class",
        type=int,
        default=_D.batch_size_per_class,
        help="online-EM mini-batch size per class",
    )
    g.add_argument(
        "--full-iters",
        type=int,
        default=_D.n_final_full_iterations,
        help="final full iterations over all particles",
    )
    g.add_argument(
        "--icuf", type=float, default=_D.icuf, help="initial classification uncertainty factor"
    )
    g.add_argument(
        "--anneal-start",
        type=int,
        default=_D.annealing_start_iteration,
        help="online iteration at which sigma annealing starts",
    )
    g.add_argument(
        "--anneal-iters",
        type=int,
        default=_D.n_annealing_iterations,
        help="online iterations over which sigma is annealed",
    )
    g.add_argument("--white-noise", action="store_true", help="white noise model")
    g.add_argument(
        "--ctf",
        choices=("full", "flip", "off"),
        default=_D.ctf_correction,
        help="CTF correction: full, phase-flip only, or off (negative stain)",
    )
    g.add_argument(
        "--clamp-solvent", action="store_true", help="force the density outside the mask to zero"
    )
    g.add_argument(
        "--particle-diameter",
        type=float,
        default=None,
        help="particle diameter (Å; default 80%% of the box)",
    )
    g.add_argument(
        "--mask-diameter",
        type=float,
        default=None,
        help="inner diameter of the circular mask (Å; default: particle diameter)",
    )
    g.add_argument(
        "--mask-outer-diameter",
        type=float,
        default=None,
        help="outer diameter of the soft mask edge (Å; default inner + 20%%)",
    )
    g.add_argument("--no-recenter", action="store_true", help="do not re-centre classes")
    g.add_argument(
        "--recenter-threshold",
        type=float,
        default=_D.recenter_threshold,
        help="re-centring threshold (fraction of the class maximum)",
    )
    g.add_argument(
        "--recenter-binary",
        action="store_true",
        help="re-centre on the binary mask above threshold",
    )
    g.add_argument(
        "--marginalize",
        action="store_true",
        help="marginalise over poses instead of taking the best pose",
    )
    g.add_argument(
        "--inplane-step",
        type=float,
        default=None,
        help="in-plane angular step (degrees; default from the particle radius)",
    )
    g.add_argument(
        "--max-shift",
        type=float,
        default=None,
        help="maximum shift searched (Å; default 10%% of the box)",
    )
    g.add_argument(
        "--no-reseed", action="store_true", help="do not re-seed classes that empty out"
    )
    g.add_argument(
        "--hard-last", action="store_true", help="hard classification in the last iteration"
    )
    g.add_argument("--seed", type=int, default=_D.seed, help="random seed")
    g.add_argument("--device", default=_D.device, help="auto, cpu or cuda[:N]")
    g.add_argument(
        "--memory-gb",
        type=float,
        default=_D.memory_budget_GB,
        help="memory the E-step may use at once (GiB)",
    )


def config_from_args(args: argparse.Namespace, **extra) -> Class2DConfig:
    """The validated job configuration from parsed options (``extra`` adds fields)."""
    return Class2DConfig(
        n_classes=args.classes,
        max_res_A=args.max_res,
        max_align_res_A=args.max_align_res,
        min_align_res_A=args.min_align_res,
        n_online_em_iterations=args.online_iters,
        batch_size_per_class=args.batch_per_class,
        n_final_full_iterations=args.full_iters,
        icuf=args.icuf,
        annealing_start_iteration=args.anneal_start,
        n_annealing_iterations=args.anneal_iters,
        white_noise=args.white_noise,
        ctf_correction=args.ctf,
        clamp_solvent=args.clamp_solvent,
        particle_diameter_A=args.particle_diameter,
        mask_inner_diameter_A=args.mask_diameter,
        mask_outer_diameter_A=args.mask_outer_diameter,
        recenter=not args.no_recenter,
        recenter_threshold=args.recenter_threshold,
        recenter_binary=args.recenter_binary,
        force_max_over_poses=not args.marginalize,
        inplane_step_deg=args.inplane_step,
        max_shift_A=args.max_shift,
        reseed_empty_classes=not args.no_reseed,
        hard_classification_last=args.hard_last,
        seed=args.seed,
        device=args.device,
        memory_budget_GB=args.memory_gb,
        **extra,
    ).validate()
