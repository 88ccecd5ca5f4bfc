"""`python -m optimal_sampling`: the same command as the `optimal-sampling` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
