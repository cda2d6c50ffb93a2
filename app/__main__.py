"""`python -m app` is `shardserve`."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
