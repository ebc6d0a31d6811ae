"""Moved to `devtools.harness` (the tests and the benchmarks share it); kept importable here."""

from devtools.harness import *  # noqa: F403
