"""Memory probe for bench/memory.py (a diagnostic only; never loaded by Sluice otherwise).

``python -m bench.memory --probe`` starts gunicorn with this directory on PYTHONPATH and
BENCH_MEMPROBE=<dir>. Each process (the gunicorn workers inherit the handler from the master)
answers SIGRTMIN+3: the first time by starting tracemalloc (and writing
<dir>/tracing-<pid>), the next times by dumping a snapshot to <dir>/tracemalloc-<pid>-<n>.snap,
so a snapshot holds what was allocated since tracing started and is still alive.
"""

import os

if os.environ.get("BENCH_MEMPROBE"):
    import signal
    import tracemalloc

    _dumps = [0]

    def _probe(signum, frame):
        where = os.environ["BENCH_MEMPROBE"]
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get("BENCH_MEMPROBE_FRAMES", "12")))
            with open(os.path.join(where, f"tracing-{os.getpid()}"), "w"):
                pass
            return
        _dumps[0] += 1
        path = os.path.join(where, f"tracemalloc-{os.getpid()}-{_dumps[0]}.snap")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGRTMIN + 3, _probe)
