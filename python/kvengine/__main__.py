"""``python -m kvengine`` — the same command line as the ``kvengine`` script."""
import sys

from .cli import main

sys.exit(main())
