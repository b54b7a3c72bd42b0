"""``python -m mtlkit`` (and ``torchrun -m mtlkit``)."""

import sys

from mtlkit.cli import main

sys.exit(main())
