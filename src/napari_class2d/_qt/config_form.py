"""A parameter form built from :class:`Class2DConfig`'s fields and docstring.

No parameter is listed here by hand except which ones are shown up front:
widget types follow the field types, labels follow the field names, tooltips
come from the ``Attributes`` section of the class docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable

from magicgui import widgets
from qtpy.QtWidgets import QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_class2d.engine.config import Class2DConfig, ConfigError

#: shown up front in both job widgets (the rest go to "Advanced")
COMMON_FIELDS = (
    "n_classes",
    "max_res_A",
    "particle_diameter_A",
    "n_online_em_iterations",
    "batch_size_per_class",
    "n_final_full_iterations",
    "ctf_correction",
    "seed",
    "device",
)
#: only meaningful for streaming jobs (hidden in the batch widget)
STREAMING_FIELDS = (
    "start_after_n_particles",
    "full_iteration_every_n_new",
    "stream_mode",
    "full_pass_every_n_updates",
)
STREAMING_COMMON = ("start_after_n_particles", "full_iteration_every_n_new")

_INT_MAX = 10**9


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


def field_label(name: str) -> str:
    """A readable label that keeps the parameter's name: ``max_res_A`` -> ``max res (Å)``."""
    unit = ""
    for suffix, u in (("_A", "Å"), ("_deg", "°"), ("_GB", "GiB")):
        if name.endswith(suffix):
            name, unit = name[: -len(suffix)], u
    label = name.replace("_", " ")
    return f"{label} ({unit})" if unit else label


def _is_optional(tp) -> tuple[bool, type]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def _device_choices() -> list[str]:
    choices = ["auto", "cpu"]
    try:
        import torch

        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return choices


class ConfigForm(QWidget):
    """Widgets for every :class:`Class2DConfig` field; common ones up front.

    Parameters
    ----------
    streaming
        Show the streaming-only parameters (hidden for batch jobs, where they do nothing).
    on_change
        Called with no argument whenever any value changes.
    """

    def __init__(self, streaming: bool = False, on_change: Callable[[], None] | None = None):
        super().__init__()
        self.streaming = streaming
        self._on_change = on_change
        docs = attribute_docs()
        hints = typing.get_type_hints(Class2DConfig)
        defaults = Class2DConfig()
        self.fields: dict[str, widgets.Widget] = {}
        self._optional: set[str] = set()
        common = list(COMMON_FIELDS) + (list(STREAMING_COMMON) if streaming else [])
        common_w, advanced_w = [], []
        for f in dataclasses.fields(Class2DConfig):
            if f.name == "extra" or (f.name in STREAMING_FIELDS and not streaming):
                continue
            w = self._make_widget(f.name, hints[f.name], getattr(defaults, f.name))
            w.tooltip = f"{docs.get(f.name, '')}\n[{f.name}]".strip()
            w.changed.connect(self._changed)
            self.fields[f.name] = w
            (common_w if f.name in common else advanced_w).append(w)
        common_w.sort(key=lambda w: common.index(w.name))
        self.common = widgets.Container(widgets=common_w)
        self.advanced = widgets.Container(widgets=advanced_w)
        self.collapsible = QCollapsible("Advanced parameters")
        self.collapsible.addWidget(self.advanced.native)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.common.native)
        layout.addWidget(self.collapsible)

    def _make_widget(self, name: str, tp, default) -> widgets.Widget:
        optional, base = _is_optional(tp)
        label = field_label(name)
        if name == "device":
            return widgets.ComboBox(
                name=name, label=label, choices=_device_choices(), value="auto"
            )
        if typing.get_origin(base) is typing.Literal:
            return widgets.ComboBox(
                name=name, label=label, choices=list(typing.get_args(base)), value=default
            )
        if optional:
            self._optional.add(name)
            w = widgets.LineEdit(name=name, label=label, value="" if default is None else default)
            w.native.setPlaceholderText("auto")
            return w
        if base is bool:
            return widgets.CheckBox(name=name, label=label, value=default)
        if base is int:
            return widgets.SpinBox(name=name, label=label, value=default, min=0, max=_INT_MAX)
        if base is float:
            return widgets.FloatSpinBox(
                name=name, label=label, value=default, min=0.0, max=1e6, step=0.1
            )
        return widgets.LineEdit(name=name, label=label, value=str(default))

    def _changed(self, *_):
        if self._on_change is not None:
            self._on_change()

    # -- values -------------------------------------------------------------------------
    def values(self) -> dict:
        """The form's values as ``Class2DConfig`` keyword arguments.

        Raises
        ------
        ConfigError
            When an optional field holds text that is not a number.
        """
        hints = typing.get_type_hints(Class2DConfig)
        out = {}
        for name, w in self.fields.items():
            v = w.value
            if name in self._optional:
                text = str(v).strip()
                if text == "" or text.lower() in ("auto", "none"):
                    v = None
                else:
                    base = _is_optional(hints[name])[1]
                    try:
                        v = base(float(text)) if base is int else base(text)
                    except ValueError:
                        raise ConfigError(
                            f"{name}={text!r}: must be a number (or empty for auto)"
                        ) from None
                    if base is int and float(text) != v:
                        raise ConfigError(f"{name}={text!r}: must be a whole number") from None
            out[name] = v
        return out

    def config(self) -> Class2DConfig:
        """The validated config (raises :class:`ConfigError` with the reason)."""
        return Class2DConfig(**self.values()).validate()

    def set_config(self, config: Class2DConfig) -> None:
        """Show ``config``'s values in the form."""
        for name, w in self.fields.items():
            v = getattr(config, name)
            w.value = ("" if v is None else str(v)) if name in self._optional else v
