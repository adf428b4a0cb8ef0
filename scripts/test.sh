#!/usr/bin/env bash
# Install what the tests need on a fresh Debian machine (as root) and run the whole suite
# under Xvfb. This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
# Xvfb for the napari tests (required); RELION 3.1 (Debian's package) for the tests that
# run RELION's own programs on our outputs (they skip where it cannot be installed)
if ! command -v xvfb-run >/dev/null 2>&1 || ! command -v relion_refine >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 \
    libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libxcb-cursor0 \
    libgl1 libegl1 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3
  DEBIAN_FRONTEND=noninteractive apt-get install -y relion \
    || echo "RELION could not be installed: tests/test_relion_reads.py will skip"
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[testing]"
ruff check src tests benchmarks
xvfb-run -a -s "-screen 0 1280x1024x24" python3 -m pytest -q -p no:cacheprovider "$@"
