"""/metrics sums every worker; logs are JSON lines without content or keys."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.harness import wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"
UPSTREAM = ("upstream", "default")  # the one upstream of OPENAI_BASE_URL (API.md section 11)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_known_traffic(make_sluice, fresh_limits, simulator, tag):
    server = make_sluice(workers=2, RATE_LIMIT_STREAM="6/minute")
    for i in range(3):
        EventStream(server.base, PATH, {"prompt": f"ok{i} sim:tokens=7"}).read_all()
    cancelled = EventStream(server.base, PATH, {"prompt": "x sim:tokens=9999 sim:rate=30"})
    cancelled.until("token")
    request(server.base, "DELETE", f"{PATH}/{cancelled.stream_id}")
    cancelled.read_all()
    EventStream(server.base, PATH, {"prompt": "x sim:fail=500"}).read_all()
    gone = EventStream(
        server.base, PATH, {"prompt": f"x sim:tokens=9999 sim:rate=30 sim:tag={tag}"}
    )
    gone.until("token")
    gone.close()
    simulator.record(tag)
    assert request(server.base, "POST", PATH, {"prompt": "x"})[0] == 429  # 7th start

    def settled():
        m = scrape(server.base)
        cancelled = ("sluice_generations_total", (("reason", "cancelled"), UPSTREAM))
        return m if m.get(cancelled) == 2 else None

    m = wait_for(settled, 10, "generations counted")
    assert m[("sluice_generations_total", (("reason", "stop"), UPSTREAM))] == 3
    assert m[("sluice_generations_total", (("reason", "error"), UPSTREAM))] == 1
    assert m[("sluice_upstream_errors_total", (("code", "upstream_error"), UPSTREAM))] == 1
    assert m[("sluice_cancel_latency_seconds_count", ())] == 1
    assert m[("sluice_client_disconnects_total", ())] == 1
    assert m[("sluice_rate_limit_rejections_total", (("code", "rate_limited"),))] == 1
    assert m[("sluice_live_streams", ())] == 0
    assert m[("sluice_time_to_first_token_seconds_count", (UPSTREAM,))] == 5
    assert m[("sluice_tokens_relayed_total", (UPSTREAM,))] >= 21 + 2


def test_logs_are_json_lines_without_prompts(sluice):
    secret_prompt = "my secret plans sim:tokens=3"
    stream = EventStream(sluice.base, PATH, {"prompt": secret_prompt})
    stream.read_all()

    def finished_line():
        for line in sluice.log_path.read_text().splitlines():
            if stream.stream_id in line and "generation_finished" in line:
                return json.loads(line)
        return None

    entry = wait_for(finished_line, 5, "generation log line")
    assert entry["reason"] == "stop" and entry["tokens"] == 3
    assert {"ttft_ms", "upstream_head_ms", "elapsed_ms", "client", "worker"} <= set(entry)
    log = sluice.log_path.read_text()
    assert "secret plans" not in log
    assert any(
        json.loads(line).get("event") == "request"
        for line in log.splitlines()
        if line.startswith("{")
    )
