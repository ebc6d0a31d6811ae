"""Are finished generations freed by reference counting alone? (``python -m tests.gc_probe``)

Run in its own process (gevent's monkey-patching, as in a gunicorn worker) by
tests/test_memory_release.py: ``python -m tests.gc_probe REDIS_URL UPSTREAM_V1``.
It builds the real app (`create_app`) on that Redis and upstream, turns the
cyclic garbage collector off, ends one generation through each path (normal
end, upstream error, cancel, client gone, upstream silent, worker shutdown),
drops every reference the probe holds, and reports on stdout, as one JSON
object per path, whether the `Generation` was freed without a collection
(``freed``), and if not what still refers to it and whether a full
``gc.collect()`` frees it (a reference cycle) or not (a leak).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402

from app import create_app  # noqa: E402
from config.settings import load_settings  # noqa: E402

PATH = "/api/v1/completions/stream"
FREE_WAIT = 2.0  # seconds for the last callbacks of a finished generation to run


def referrer_chain(obj: object, depth: int = 4) -> list[str]:
    """Type names of what refers to `obj`, a few levels up (for the failure message)."""
    names, level = [], [obj]
    for _ in range(depth):
        up = [r for o in level for r in gc.get_referrers(o) if r is not level]
        names.append(", ".join(sorted({type(r).__name__ for r in up}))[:300])
        level = up[:8]
        if not level:
            break
    return names


def frame_holders(obj: object) -> list[str]:
    """Functions of suspended greenlets whose local variables hold `obj`.

    Such a frame is invisible to ``gc.get_referrers`` (it is not a frame object
    until looked at), so a loop variable left bound after its loop pins the last
    object it named for as long as the function sleeps.
    """
    found = []
    for candidate in gc.get_objects():
        if not isinstance(candidate, greenlet.greenlet) or candidate is greenlet.getcurrent():
            continue
        frame = candidate.gr_frame
        while frame is not None:
            # f_locals is a snapshot the frame keeps (holding what it held): each call
            # refreshes it, so frame_holders(None) lets go of what an earlier call saw
            values = frame.f_locals.values()
            if obj is not None and any(value is obj for value in values):
                found.append(frame.f_code.co_qualname)
            frame = frame.f_back
    return found


def only_the_watchdog(held_by: list[str]) -> bool:
    """Held only by the silence watchdog's loop (see the report of issue 15)."""
    return bool(held_by) and all(name.endswith("watchdog") for name in held_by)


class Probe:
    def __init__(self, redis_url: str, upstream: str):
        settings = load_settings(
            {
                "APP_ENV": "test",
                "REDIS_URL": redis_url,
                "OPENAI_BASE_URL": upstream,
                "OPENAI_API_KEY": "sk-test",
                "DISCONNECT_GRACE_SECONDS": "0",
                "UPSTREAM_TIMEOUT_SECONDS": "1",
                "UPSTREAM_HEAD_TIMEOUT_SECONDS": "1",
                "HEARTBEAT_SECONDS": "1",
                "RATE_LIMIT_DEFAULT": "100000/minute",
                "RATE_LIMIT_STREAM": "100000/minute",
                "MAX_CONCURRENT_STREAMS": "1000",
            }
        )
        self.app = create_app(settings)
        self.manager = self.app.extensions["sluice"].manager
        self.client = self.app.test_client()

    def open(self, prompt: str, chunks: int = 2):
        """POST a stream and read `chunks` body pieces; (response, weakref to its Generation)."""
        resp = self.client.post(PATH, json={"prompt": prompt}, buffered=False)
        assert resp.status_code == 200, resp.get_data()
        stream_id = resp.headers["X-Stream-ID"]
        ref = weakref.ref(self.manager.local[stream_id])
        body = iter(resp.response)
        head = [next(body) for _ in range(chunks)]
        return resp, itertools.chain(head, body), stream_id, ref

    def report(self, path: str, ref: weakref.ref, reason: str | None) -> dict:
        deadline = time.monotonic() + FREE_WAIT
        while ref() is not None and time.monotonic() < deadline:
            gevent.sleep(0.02)  # the hub runs the generation's last callbacks meanwhile
        gen = ref()
        result = {"path": path, "reason": reason, "freed": gen is None}
        if gen is None:
            return result
        result["done"] = gen.done
        result["held_by"] = frame_holders(gen)
        result["referrers"] = referrer_chain(gen)
        del gen
        if only_the_watchdog(result["held_by"]):
            # its loop variable keeps the last generation it checked until it checks
            # another: let it, then see whether anything else held this one
            other, _, _, _ = self.open("other sim:tokens=20 sim:rate=20", chunks=1)
            deadline = time.monotonic() + FREE_WAIT
            while time.monotonic() < deadline:
                frame_holders(None)  # refresh the snapshots that frame_holders(gen) took
                if ref() is None:
                    break
                gevent.sleep(0.02)
            other.close()
            result["freed_once_the_watchdog_moved_on"] = ref() is None
            if ref() is None:
                return result
        gc.collect()
        result["freed_by_full_gc"] = ref() is None
        return result

    @staticmethod
    def drain(resp, body) -> str | None:
        """Read the body to its end; the reason of its `done` event."""
        text = b"".join(body)
        resp.close()
        for line in text.splitlines():
            if line.startswith(b"data:") and b'"type":"done"' in line:
                return json.loads(line[5:])["reason"]
        return None

    def normal_end(self) -> dict:
        resp, body, _, ref = self.open("hi sim:tokens=5 sim:rate=0")
        reason = self.drain(resp, body)
        del resp, body
        return self.report("stop", ref, reason)

    def upstream_error(self) -> dict:
        resp, body, _, ref = self.open("hi sim:tokens=50 sim:rate=50 sim:close_after=3")
        reason = self.drain(resp, body)
        del resp, body
        return self.report("upstream error", ref, reason)

    def cancel(self) -> dict:
        resp, body, stream_id, ref = self.open("hi sim:tokens=5000 sim:rate=50")
        deleted = self.client.delete(f"{PATH}/{stream_id}")
        assert deleted.status_code == 200, deleted.get_data()
        reason = self.drain(resp, body)
        del resp, body, deleted
        return self.report("cancel", ref, reason)

    def client_gone(self) -> dict:
        resp, body, _, ref = self.open("hi sim:tokens=5000 sim:rate=50")
        resp.close()  # the body's close: the follower detaches, grace 0 s, cancelled
        del resp, body
        gen = ref()
        if gen is not None:
            gen.ended.wait(5)
        reason = gen.reason if gen is not None else None
        del gen
        return self.report("client gone", ref, reason)

    def upstream_silent(self) -> dict:
        resp, body, _, ref = self.open(
            "hi sim:tokens=50 sim:rate=50 sim:stall_after=2 sim:stall=30"
        )
        reason = self.drain(resp, body)  # the watchdog ends it after 1 s of silence
        del resp, body
        return self.report("upstream silent", ref, reason)

    def detached(self) -> dict:
        started = self.client.post("/api/v1/completions", json={"prompt": "hi sim:tokens=5000"})
        assert started.status_code == 202, started.get_data()
        ref = weakref.ref(self.manager.local[started.get_json()["stream_id"]])
        del started
        gen = ref()
        if gen is not None:
            gen.ended.wait(5)  # nobody attaches: cancelled after the grace window
        reason = gen.reason if gen is not None else None
        del gen
        return self.report("detached, never attached", ref, reason)

    def shutdown(self) -> dict:
        resp, body, _, ref = self.open("hi sim:tokens=5000 sim:rate=50")
        self.manager.shutdown(timeout=5)
        reason = self.drain(resp, body)
        del resp, body
        return self.report("shutdown", ref, reason)


def main() -> int:
    gc.collect()
    gc.disable()  # only reference counting frees anything from here on
    probe = Probe(sys.argv[1], sys.argv[2])
    paths = sys.argv[3:] or [
        "normal_end",
        "upstream_error",
        "cancel",
        "client_gone",
        "upstream_silent",
        "detached",
        "shutdown",  # last: it stops the manager's loops
    ]
    for name in paths:
        print(json.dumps(getattr(probe, name)()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
