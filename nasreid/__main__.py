"""``python -m nasreid ...`` (what ``torchrun -m nasreid`` runs): the ``nasreid`` command line."""
import sys

from nasreid.cli import main

sys.exit(main())
