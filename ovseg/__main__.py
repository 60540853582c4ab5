"""``python -m ovseg`` — also what Lightning's DDP launcher re-runs on every rank."""

import sys

from ovseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
