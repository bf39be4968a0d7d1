"""Entry point of `python -m tpu_launch`."""

import sys

from tpu_launch.cli import main

sys.exit(main())
