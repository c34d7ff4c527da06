"""``python -m rhovae``: the ``rhovae`` command, also what ``torchrun -m rhovae train ...`` starts."""

import sys

from rhovae.cli import main

if __name__ == "__main__":
    sys.exit(main())
