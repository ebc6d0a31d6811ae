"""REDIS_URL through Redis Sentinel (redis+sentinel://), as for several hosts with failover."""

from __future__ import annotations

import subprocess

import pytest

from config.devservices import redis_server_binary
from devtools.harness import RedisServer, Sluice, free_port, wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"


@pytest.fixture()
def sentinel_url(tmp_path):
    master = RedisServer().start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its own config file
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor sluice 127.0.0.1 {master.port} 1\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # its own "+monitor master" line: ready
        if "+monitor master sluice" in line:
            break
    yield f"redis+sentinel://127.0.0.1:{port}/sluice/0", master
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()
    master.stop()


def test_streams_and_cross_worker_cancel_through_sentinel(sentinel_url, simulator, tag):
    url, master = sentinel_url
    server = Sluice(
        {
            "REDIS_URL": url,
            "OPENAI_BASE_URL": simulator.v1,
            "OPENAI_API_KEY": "k",
            "DISCONNECT_GRACE_SECONDS": "0",
        },
        workers=2,
    ).start()
    try:
        assert request(server.base, "GET", "/ready")[0] == 200
        done = EventStream(server.base, PATH, {"prompt": "x sim:tokens=5"}).read_all()
        assert done[-1]["data"]["reason"] == "stop"
        stream = EventStream(
            server.base, PATH, {"prompt": f"x sim:tokens=9999 sim:rate=30 sim:tag={tag}"}
        )
        stream.until("token")
        for _ in range(3):  # whichever worker takes it
            status, _, body = request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")
            assert status == 200 and body["status"] in ("cancelled", "finished")
        assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
        assert simulator.record(tag, timeout=2)["state"] == "client_closed"
        import redis

        direct = redis.Redis(port=master.port)
        wait_for(
            lambda: direct.hget(keys.registry(stream.stream_id), "state") == b"finished",
            5,
            "the registry lives on the master",
        )
        direct.close()
    finally:
        server.stop()


def test_a_sentinel_url_without_a_service_is_refused():
    from config.settings import SettingsError, load_settings
    from streaming.redis_conn import connect

    assert load_settings({"REDIS_URL": "redis+sentinel://h:26379/svc"}).redis_url
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings({"REDIS_URL": "sentinel://h"})
    with pytest.raises(ValueError, match="service"):
        connect("redis+sentinel://127.0.0.1:1")
