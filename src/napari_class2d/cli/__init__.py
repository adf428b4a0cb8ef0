"""Command line entry point: ``napari-class2d COMMAND ...``.

Each command lives in its own module with ``add_args(parser)`` and
``main(args) -> int`` (cryoDRGN style); modules are imported lazily so
``napari-class2d info`` does not pay for torch or Qt start-up it does not need.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("napari_class2d.cli.info", "describe a particle file as one JSON object"),
    "simulate": ("napari_class2d.cli.simulate", "simulate a ground-truth particle set"),
    "classify": ("napari_class2d.cli.classify", "run a batch 2D classification"),
    "demo": ("napari_class2d.cli.demo", "simulate, classify and score a built-in data set"),
    "stream": ("napari_class2d.cli.stream", "classify particles while they arrive"),
    "select": ("napari_class2d.cli.select", "export the particles of chosen classes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-class2d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_args(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
