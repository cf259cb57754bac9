"""``python -m dynascope`` runs the command line (also under ``torchrun -m dynascope``)."""

import sys

from dynascope.cli import main

sys.exit(main())
