"""Command-line flags generated from the option dataclasses.

One flag per field of :class:`~napari_class2d.engine.config.Class2DConfig`,
:class:`~napari_class2d.run.spec.SourceOptions` and
:class:`~napari_class2d.run.spec.StreamOptions`; the widgets' forms are generated
from the same dataclasses. A field's flag is ``--`` and its name without the unit
(``max_res_A`` -> ``--max-res``; seconds stay: ``--poll-seconds``) unless
:data:`FLAGS` keeps the short name scripts use; its help is the field's
description, its type and choices follow the annotation, a yes/no field gets
``--x`` and ``--no-x``, an optional one also takes ``auto``. A field added to a
dataclass gets a flag here without any change.
"""

from __future__ import annotations

import argparse
import math

from napari_class2d.engine.config import Class2DConfig
from napari_class2d.run.fields import (
    STREAMING_FIELDS,
    attribute_docs,
    choices,
    field_kind,
    fields,
    plain,
    split_unit,
)
from napari_class2d.run.spec import SourceOptions, StreamOptions

#: flag names other than the derived ``--name`` (the names scripts and docs use)
FLAGS = {
    "n_classes": "--classes",
    "n_online_em_iterations": "--online-iters",
    "batch_size_per_class": "--batch-per-class",
    "n_final_full_iterations": "--full-iters",
    "annealing_start_iteration": "--anneal-start",
    "n_annealing_iterations": "--anneal-iters",
    "ctf_correction": "--ctf",
    "mask_inner_diameter_A": "--mask-diameter",
    "reseed_empty_classes": "--reseed",
    "hard_classification_last": "--hard-last",
    "memory_budget_GB": "--memory-gb",
    "start_after_n_particles": "--start-after",
    "full_iteration_every_n_new": "--full-every",
    "stream_mode": "--mode",
    "full_pass_every_n_updates": "--full-pass-every",
    "finish_after_idle_seconds": "--finish-after-idle",
}
#: unit -> placeholder in the help (``--max-res A``)
METAVARS = {"Å": "A", "°": "DEG", "GiB": "GIB", "s": "S"}
#: extra flags that set a yes/no field to the opposite of its name
NEGATIVE_ALIASES = {"force_max_over_poses": "--marginalize"}


def flag_for(name: str) -> str:
    """The flag of field ``name``: ``max_res_A`` -> ``--max-res``."""
    if name in FLAGS:
        return FLAGS[name]
    stem, unit = split_unit(name)
    if unit == "s":  # --poll-seconds reads better than --poll
        stem = name
    return "--" + stem.replace("_", "-")


def _number(kind: type, name: str, optional: bool):
    def parse(text: str):
        if optional and text.strip().lower() in ("auto", "none", ""):
            return None
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of ``cls`` (``dest`` = the field name; absent unless given)."""
    docs = attribute_docs(cls)
    defaults = cls()
    for f, tp in fields(cls, skip):
        name = f.name
        flag = flag_for(name)
        optional, base = field_kind(tp)
        default = getattr(defaults, name)
        help_text = plain(docs.get(name, "")).rstrip(".")
        shown = "auto" if default is None else default
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
        if base is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                help=f"{help_text} (default: {'on' if default else 'off'})",
                **kwargs,
            )
            if name in NEGATIVE_ALIASES:
                parser.add_argument(
                    NEGATIVE_ALIASES[name],
                    action="store_false",
                    help=f"the same as --no-{flag[2:]}",
                    **kwargs,
                )
            continue
        allowed = choices(tp)
        if allowed is not None:
            kwargs["choices"] = allowed
        elif base in (int, float):
            kwargs["type"] = _number(base, name, optional)
            unit = split_unit(name)[1]
            kwargs["metavar"] = METAVARS.get(unit, "N" if base is int else "X")
        parser.add_argument(
            flag, help=f"{help_text} (default: {shown})".replace("%", "%%"), **kwargs
        )


def values_from_args(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` given on the command line."""
    return {f.name: getattr(args, f.name) for f, _ in fields(cls) if hasattr(args, f.name)}


def add_config_args(parser: argparse.ArgumentParser, streaming: bool) -> None:
    """Every classifier option (the streaming-only ones only for streaming commands)."""
    group = parser.add_argument_group("classification")
    add_dataclass_args(group, Class2DConfig, skip=() if streaming else STREAMING_FIELDS)


def add_source_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser.add_argument_group("particle files"), SourceOptions)


def add_stream_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser.add_argument_group("streaming"), StreamOptions)


def config_from_args(args: argparse.Namespace) -> Class2DConfig:
    """The validated job configuration: the dataclass defaults and the flags given."""
    return Class2DConfig(**values_from_args(args, Class2DConfig)).validate()


def source_options(args: argparse.Namespace) -> SourceOptions:
    values = values_from_args(args, SourceOptions)
    if values.get("project_dir") is not None:
        values["project_dir"] = str(values["project_dir"])
    return SourceOptions(**values)


def stream_options(args: argparse.Namespace) -> StreamOptions:
    return StreamOptions(**values_from_args(args, StreamOptions))
