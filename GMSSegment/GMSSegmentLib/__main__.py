"""``python -m GMSSegmentLib ...`` is the ``gms`` command line, and the worker process the Slicer module launches."""
import sys

from .cli import main

sys.exit(main())
