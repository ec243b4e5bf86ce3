"""``python -m snapgen.train --config FILE`` (e.g. under ``torchrun --nproc-per-node N``) = ``snapgen train``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
