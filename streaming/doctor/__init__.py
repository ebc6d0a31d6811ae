"""The stream doctor: is something between a client and Sluice buffering event streams?

``python -m streaming.doctor BASE_URL [--idle S] [--json] [--insecure]`` (also
``make doctor URL=...``) calls ``GET BASE_URL/api/v1/diagnostics/stream``
(`streaming.web.diagnostics`) through whatever stands between (nginx, a CDN,
a corporate proxy; the environment's proxy variables apply), measures when
each probe arrives against when it was sent, and prints a verdict with the
likely culprit. docs/DEPLOY.md ("Is something buffering my streams?") reads
the verdicts and gives the fixes.

- `measure` — the request, and the arrival time of every frame.
- `verdict` — the rules (held back, cut, pings lost) and the culprits.
- `__main__` — the command line and its exit status: 0 events arrive as
  sent (and survive ``--idle``), 1 held back / cut / pings lost, 2 the probe
  stream could not be obtained (refused, DNS, TLS, a proxy refusing, no
  answer head, or any answer that is not a 200 ``text/event-stream``).
"""
