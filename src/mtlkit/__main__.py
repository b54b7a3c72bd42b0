"""``python -m mtlkit`` (and ``torchrun -m mtlkit``)."""

import sys

from mtlkit.app.cli import main

sys.exit(main())
