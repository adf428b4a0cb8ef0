import sys

from napari_class2d.cli import main

sys.exit(main())
