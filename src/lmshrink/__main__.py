"""``python -m lmshrink`` (and ``torchrun -m lmshrink``): the command line."""

import sys

from lmshrink.cli import main

if __name__ == "__main__":
    sys.exit(main())
