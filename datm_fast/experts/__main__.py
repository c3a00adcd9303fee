"""``python -m datm_fast.experts buffer ...``: the ``datm-fast buffer`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
