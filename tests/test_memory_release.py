"""A finished generation is freed at once by reference counting, on every path.

A generation caught in a reference cycle lives until Python's rare full
collection, with all its text and frames (issue 15: three waves of 30 slow
readers grew the workers by 0.3 to 0.6 GB). tests/gc_probe.py runs the real app
under gevent with the cyclic collector off, against the real Redis and the
simulator over HTTP, and reports per path whether the generation was freed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devtools.harness import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATHS = {
    "normal_end": "stop",
    "upstream_error": "error",
    "cancel": "cancelled",
    "client_gone": "cancelled",
    "upstream_silent": "error",
    "detached": "cancelled",
    "shutdown": "error",
}


def test_finished_generations_are_freed_without_a_garbage_collection(redis_server, simulator):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gc_probe", redis_server.url, simulator.v1, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["reason"] for r in results] == list(PATHS.values()), results
    pinned = [r for r in results if not r["freed"]]  # nothing may hold a finished one
    assert not pinned, json.dumps(pinned, indent=1)
