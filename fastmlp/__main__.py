"""python -m fastmlp: the same as fastmlp-train."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
