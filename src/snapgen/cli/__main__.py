"""``python -m snapgen.cli ...`` (e.g. ``torchrun -m snapgen.cli train``) = ``snapgen ...``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
