from napari_class2d.cli import main
import sys

sys.exit(main())
