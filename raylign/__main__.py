"""`python -m raylign ...` is the `raylign` command."""

import sys

from raylign.cli import main

if __name__ == "__main__":
    sys.exit(main())
