"""Moved to `devtools.simulator`; ``python -m streaming.simulator`` still runs it."""

from devtools.simulator import *  # noqa: F403
from devtools.simulator import main

if __name__ == "__main__":
    raise SystemExit(main())
