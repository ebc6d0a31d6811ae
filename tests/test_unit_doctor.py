"""The stream doctor's rules on made-up measurements (streaming/doctor/verdict.py).

The real thing, through real nginx variants, is tests/test_doctor.py.
"""

from __future__ import annotations

import pytest

from streaming.doctor.__main__ import render
from streaming.doctor.measure import Frame, Measurement, _Reader, _server_error, probe_url
from streaming.doctor.verdict import diagnose

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

T0 = 1_800_000_000.0  # our clock at the request
SLUICE = {"server": "gunicorn", "content-type": "text/event-stream", "x-accel-buffering": "no"}


def measurement(
    arrivals: list[float],
    *,
    skew: float = 0.0,
    headers: dict | None = None,
    idle: float = 0.0,
    pings: list[float] = (),
    done_at: float | None = None,
    ping_interval: float = 0.0,
    pings_sent: int = 0,
    protocol: str = "HTTP/1.1",
) -> Measurement:
    """Probes sent at 0, 0.25, ... s (server clock = ours + skew), arriving at `arrivals`."""
    m = Measurement(url="http://x/api/v1/diagnostics/stream", idle=idle, status=200)
    m.http_version, m.started_epoch, m.head_at = "HTTP/1.1", T0, 0.01
    m.headers = dict(SLUICE if headers is None else headers)
    for i, at in enumerate(arrivals):
        data = {"seq": i + 1, "sent_at": T0 + skew + 0.005 + i * 0.25}
        data["ping_interval"] = ping_interval
        if i == 0:
            data["server"] = {"protocol": protocol, "forwarded": 1}
        m.frames.append(Frame("probe", at, data))
    m.frames += [Frame("ping", at, {"comment": "ping"}) for at in pings]
    end = done_at if done_at is not None else (arrivals[-1] if arrivals else 0.0)
    if len(arrivals) == 13 and done_at is not False:
        m.frames.append(Frame("done", end, {"pings": pings_sent}))
        m.ended = "done"
    else:
        m.ended, m.error = "eof", "the connection was closed before done"
    m.first_byte_at = arrivals[0] if arrivals else None
    m.last_byte_at = max([*arrivals, *pings]) if arrivals else None
    m.ended_at = end
    return m


AS_SENT = [0.01 + i * 0.25 for i in range(13)]


def test_as_sent_is_ok():
    d = diagnose(measurement(AS_SENT))
    assert d.status == 0 and d.verdict.startswith("OK")
    assert d.held_s < 0.01


def test_a_skewed_server_clock_changes_nothing():
    for skew in (-3600.0, 3600.0, 2.5):
        d = diagnose(measurement(AS_SENT, skew=skew))
        assert d.status == 0, skew
        assert any("differ" in fact for fact in d.facts)


def test_one_burst_at_the_end_is_held_back():
    d = diagnose(measurement([3.02 + i * 0.0001 for i in range(13)]))
    assert d.status == 1 and d.verdict.startswith("HELD BACK")
    assert 2.9 < d.held_s < 3.1
    assert "13 of 13 probes arrived together" in d.verdict


def test_a_buffer_that_fills_halfway_is_held_back():
    arrivals = [1.6] * 7 + [3.1] * 6  # two bursts
    d = diagnose(measurement(arrivals))
    assert d.status == 1 and d.held_s >= 1.0


def test_jitter_below_the_limit_is_a_note_not_a_failure():
    arrivals = list(AS_SENT)
    arrivals[3] += 0.7  # one probe late by 0.7 s (a stalled client or a busy network)
    d = diagnose(measurement(arrivals))
    assert d.status == 0
    assert any("delayed up to 0.7" in note for note in d.notes)


def test_a_cut_during_the_probes():
    d = diagnose(measurement(AS_SENT[:5]))
    assert d.status == 1 and d.verdict.startswith("CUT")


def test_idle_survived_with_pings():
    last = AS_SENT[-1]
    m = measurement(
        AS_SENT,
        idle=6,
        ping_interval=2.0,
        pings=[last + 2, last + 4],
        done_at=last + 6,
        pings_sent=2,
    )
    d = diagnose(m)
    assert d.status == 0, d.verdict
    assert d.idle["pings_received"] == 2 and d.idle["survived"]


def test_idle_cut_during_the_silence():
    last = AS_SENT[-1]
    m = measurement(AS_SENT, idle=12, ping_interval=4.0, done_at=False)
    m.ended_at = last + 2.0
    d = diagnose(m)
    assert d.status == 1
    assert "cut during the 12 s silence" in d.verdict
    assert not d.idle["survived"]
    assert any("HEARTBEAT_SECONDS" in s.fix for s in d.suspects)


def test_idle_pings_held_back_or_stripped():
    last = AS_SENT[-1]
    for pings in ([], [last + 6, last + 6]):  # stripped; held back and released with done
        m = measurement(
            AS_SENT, idle=6, ping_interval=2.0, pings=pings, done_at=last + 6, pings_sent=2
        )
        d = diagnose(m)
        assert d.status == 1 and d.verdict.startswith("PINGS LOST"), pings


BURST = [3.02] * 13


@pytest.mark.parametrize(
    "extra, first",
    [
        ({"content-encoding": "gzip"}, "compression"),
        ({"content-length": "2000"}, "whole-response"),
        ({"cf-ray": "8a1b-AMS", "server": "cloudflare"}, "cdn"),
        ({"via": "1.1 squid"}, "proxy"),
        ({"x-cache": "MISS"}, "cache"),
        ({"server": "nginx/1.22.1"}, "reverse-proxy"),
    ],
)
def test_the_likely_culprit_comes_from_the_headers(extra, first):
    headers = {**SLUICE, **extra}
    if "server" in extra or "via" in extra:
        headers.pop("x-accel-buffering")
    d = diagnose(measurement(BURST, headers=headers))
    assert d.status == 1
    assert d.suspects[0].key == first, [s.key for s in d.suspects]
    assert "Likely culprits" in render("http://x", d)


def test_cdns_are_named():
    d = diagnose(measurement(BURST, headers={**SLUICE, "cf-ray": "1", "server": "cloudflare"}))
    assert "Cloudflare" in d.suspects[0].evidence
    d = diagnose(measurement(BURST, headers={**SLUICE, "x-amz-cf-id": "abc", "via": "1.1 x"}))
    assert "CloudFront" in d.suspects[0].evidence


def test_http_1_0_on_either_side_is_a_suspect():
    d = diagnose(measurement(BURST, protocol="HTTP/1.0"))
    assert "backend-http/1.0" in [s.key for s in d.suspects]


def test_nothing_named_says_so():
    d = diagnose(measurement(BURST))
    assert d.status == 1 and d.suspects == []
    assert "unannounced proxy" in render("http://x", d)


def test_compression_that_flows_is_only_a_note():
    d = diagnose(measurement(AS_SENT, headers={**SLUICE, "content-encoding": "br"}))
    assert d.status == 0
    assert any("Content-Encoding: br" in note for note in d.notes)


def test_the_reader_stamps_frames_split_anywhere():
    m = Measurement(url="u", idle=0)
    reader = _Reader(m)
    wire = b'id: 1\r\nevent: probe\r\ndata: {"seq": 1}\r\n\r\n'
    wire += b": ping\n\nid: 2\nevent: done\ndata: {}\n\n"
    for i, byte in enumerate(wire):
        reader.feed(bytes([byte]), float(i))
    assert [(f.kind, f.data) for f in m.frames] == [
        ("probe", {"seq": 1}),
        ("ping", {"comment": "ping"}),
        ("done", {}),
    ]
    assert m.frames[0].at == wire.index(b"\r\n\r\n") + 3  # the byte that ended the frame


def test_a_server_error_event_is_quoted():
    m = Measurement(url="u", idle=0)
    _Reader(m).feed(
        b'id: 14\nevent: error\ndata: {"type": "error", "error": {"code": "interrupted", '
        b'"message": "The server is restarting."}}\n\n',
        1.0,
    )
    assert _server_error(m) == ("the server said: interrupted (The server is restarting.)")


def test_probe_url():
    assert probe_url("https://chat.example.com/", 0) == (
        "https://chat.example.com/api/v1/diagnostics/stream"
    )
    assert probe_url("http://h:8080/chat", 2.5).endswith("/chat/api/v1/diagnostics/stream?idle=2.5")
    assert probe_url("http://h/api/v1/diagnostics/stream?idle=3", 0) == (
        "http://h/api/v1/diagnostics/stream"
    )
