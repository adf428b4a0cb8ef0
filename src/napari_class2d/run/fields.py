"""What the option dataclasses say about their fields, for forms and command lines.

The widgets' forms and the commands' flags are generated from the dataclasses
(:class:`~napari_class2d.engine.config.Class2DConfig`,
:class:`~napari_class2d.run.spec.SourceOptions`,
:class:`~napari_class2d.run.spec.StreamOptions`): a field's type gives the kind
of input, its name the label and unit, and the ``Attributes`` section of the
class docstring its description. A field added to a dataclass gets a flag and
a form field without being listed anywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Literal

from napari_class2d.engine.config import Class2DConfig

#: Class2DConfig fields that only act in streaming jobs (hidden for batch jobs)
STREAMING_FIELDS = (
    "start_after_n_particles",
    "full_iteration_every_n_new",
    "stream_mode",
    "full_pass_every_n_updates",
)
#: name ending -> unit shown in labels
UNITS = (("_A", "Å"), ("_deg", "°"), ("_GB", "GiB"), ("_seconds", "s"))


def attribute_docs(cls: type = Class2DConfig) -> dict[str, str]:
    """Field name -> description, parsed from a numpy-style ``Attributes`` section."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes") + 2
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush():
        for n in names:
            out[n] = " ".join(text).strip()

    for ln in lines[start:]:
        if ln and not ln.startswith(" "):
            if re.fullmatch(r"[A-Za-z_][\w, ]*", ln.strip()) is None:
                break
            flush()
            names = [n.strip() for n in ln.split(",")]
            text = []
        elif ln.strip():
            text.append(ln.strip())
    flush()
    return out


def split_unit(name: str) -> tuple[str, str]:
    """``max_res_A`` -> ``("max_res", "Å")``; ``("seed", "")`` without a unit."""
    for suffix, unit in UNITS:
        if name.endswith(suffix):
            return name[: -len(suffix)], unit
    return name, ""


def field_label(name: str) -> str:
    """A readable label that keeps the parameter's name: ``max_res_A`` -> ``max res (Å)``."""
    stem, unit = split_unit(name)
    label = stem.replace("_", " ")
    return f"{label} ({unit})" if unit else label


def field_kind(tp) -> tuple[bool, object]:
    """``(optional, base type)`` of an annotation: ``float | None`` -> ``(True, float)``."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def choices(tp) -> list | None:
    """The allowed values of a ``Literal`` annotation, else ``None``."""
    _, base = field_kind(tp)
    if typing.get_origin(base) is Literal:
        return list(typing.get_args(base))
    return None


def fields(cls: type, skip: typing.Iterable[str] = ()) -> list[tuple[dataclasses.Field, object]]:
    """``(field, resolved type)`` of a dataclass, in order, without ``skip``."""
    hints = typing.get_type_hints(cls)
    skipped = set(skip)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in skipped]


def plain(text: str) -> str:
    """A description without reST markup (``x`` -> x, :class:`~a.B` -> B)."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")
