"""Forms built from the option dataclasses' fields and docstrings.

No parameter is listed here by hand except which ones are shown up front:
widget types follow the field types, labels follow the field names, tooltips
come from the ``Attributes`` section of the class docstring
(:mod:`napari_class2d.run.fields`, which the command line's flags use too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from magicgui import widgets
from qtpy.QtWidgets import QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.run.fields import (
    STREAMING_FIELDS,
    attribute_docs,
    choices,
    field_kind,
    field_label,
    fields,
    plain,
)

__all__ = ["COMMON_FIELDS", "ConfigForm", "DataclassForm", "attribute_docs", "field_label"]

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
STREAMING_COMMON = ("start_after_n_particles", "full_iteration_every_n_new")

_INT_MAX = 10**9


def _device_choices() -> list[str]:
    choices = ["auto", "cpu"]
    try:
        import torch

        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return choices


class DataclassForm(QWidget):
    """One widget per field of a dataclass; ``common`` ones up front, the rest folded.

    Parameters
    ----------
    cls
        The dataclass (its instances must be creatable from keyword arguments).
    skip
        Fields not shown (their defaults are used).
    common
        Fields shown up front, in this order; ``None``: all of them.
    on_change
        Called with no argument whenever any value changes.
    folded_title
        Title of the collapsible section holding the other fields.
    """

    def __init__(
        self,
        cls: type,
        *,
        skip: Iterable[str] = (),
        common: Iterable[str] | None = None,
        on_change: Callable[[], None] | None = None,
        folded_title: str = "Advanced parameters",
    ):
        super().__init__()
        self.cls = cls
        self._on_change = on_change
        docs = attribute_docs(cls)
        defaults = cls()
        self.fields: dict[str, widgets.Widget] = {}
        self._optional: set[str] = set()
        self._folders: set[str] = set()
        self._types = {f.name: tp for f, tp in fields(cls, skip)}
        common = list(self._types) if common is None else list(common)
        common_w, advanced_w = [], []
        for name, tp in self._types.items():
            w = self._make_widget(name, tp, getattr(defaults, name))
            w.tooltip = f"{plain(docs.get(name, ''))}\n[{name}]".strip()
            w.changed.connect(self._changed)
            self.fields[name] = w
            (common_w if name in common else advanced_w).append(w)
        common_w.sort(key=lambda w: common.index(w.name))
        self.common = widgets.Container(widgets=common_w)
        self.advanced = widgets.Container(widgets=advanced_w)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        if common_w:
            layout.addWidget(self.common.native)
        self.collapsible = None
        if advanced_w:
            self.collapsible = QCollapsible(folded_title)
            self.collapsible.addWidget(self.advanced.native)
            layout.addWidget(self.collapsible)

    def _make_widget(self, name: str, tp, default) -> widgets.Widget:
        optional, base = field_kind(tp)
        label = field_label(name)
        if name == "device":
            return widgets.ComboBox(
                name=name, label=label, choices=_device_choices(), value="auto"
            )
        allowed = choices(tp)
        if allowed is not None:
            return widgets.ComboBox(name=name, label=label, choices=allowed, value=default)
        if name.endswith("_dir"):
            self._folders.add(name)
            return widgets.FileEdit(name=name, label=label, mode="d", value=default or "")
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
        """The form's values as keyword arguments of the dataclass.

        Raises
        ------
        ConfigError
            When an optional field holds text that is not a number.
        """
        out = {}
        for name, w in self.fields.items():
            v = w.value
            if name in self._folders:
                text = str(v).strip() if v is not None else ""
                v = None if text in ("", ".") else text
            elif name in self._optional:
                text = str(v).strip()
                if text == "" or text.lower() in ("auto", "none"):
                    v = None
                else:
                    base = field_kind(self._types[name])[1]
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

    def value(self):
        """The dataclass instance the form shows (validated when the class can validate).

        Raises
        ------
        ConfigError
            The reason, naming the field.
        """
        obj = self.cls(**self.values())
        return obj.validate() if hasattr(obj, "validate") else obj

    def set_value(self, obj) -> None:
        """Show ``obj``'s values in the form."""
        for name, w in self.fields.items():
            v = getattr(obj, name)
            if name in self._folders:
                w.value = "" if v is None else v
            elif name in self._optional:
                w.value = "" if v is None else str(v)
            else:
                w.value = v


class ConfigForm(DataclassForm):
    """The classifier's parameters (:class:`Class2DConfig`); common ones up front.

    Parameters
    ----------
    streaming
        Show the streaming-only parameters (hidden for batch jobs, where they do nothing).
    on_change
        Called with no argument whenever any value changes.
    """

    def __init__(self, streaming: bool = False, on_change: Callable[[], None] | None = None):
        self.streaming = streaming
        common = list(COMMON_FIELDS) + (list(STREAMING_COMMON) if streaming else [])
        super().__init__(
            Class2DConfig,
            skip=() if streaming else STREAMING_FIELDS,
            common=common,
            on_change=on_change,
        )

    def config(self) -> Class2DConfig:
        """The validated config (raises :class:`ConfigError` with the reason)."""
        return self.value()

    def set_config(self, config: Class2DConfig) -> None:
        """Show ``config``'s values in the form."""
        self.set_value(config)
