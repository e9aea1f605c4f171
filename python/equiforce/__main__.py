"""``python -m equiforce ...`` is the same as the ``equiforce`` command."""
import sys

from .cli import main

sys.exit(main())
