"""``python -m streaming.doctor BASE_URL [--idle S] [--json] [--insecure]``: see the package."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from streaming.doctor.measure import Unreachable, measure
from streaming.doctor.verdict import DOCS, Diagnosis, diagnose

__all__ = ["main"]

MAX_IDLE = 120.0
EXIT_OK, EXIT_HELD, EXIT_UNREACHABLE = 0, 1, 2
WIDTH = 100


def _idle(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds <= MAX_IDLE:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_IDLE:g} seconds")
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m streaming.doctor",
        description="Check whether something between here and a Sluice deployment buffers "
        "event streams. Exit status: 0 events arrive as sent, 1 held back or cut, "
        "2 the URL cannot be reached.",
    )
    parser.add_argument("base_url", help="the deployment's root, e.g. https://chat.example.com")
    parser.add_argument(
        "--idle",
        type=_idle,
        default=0.0,
        metavar="S",
        help="then stay silent S seconds (pings only; 0-120) and check the connection "
        "survives; S >= 3 x HEARTBEAT_SECONDS pings exactly as real streams do",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.json:  # the wait (3 s, plus the idle period) is not silent
        print(f"Probing {args.base_url} for about {3 + args.idle:g} s ...", file=sys.stderr)
    try:
        m = measure(args.base_url, args.idle, verify=not args.insecure)
    except Unreachable as exc:
        if args.json:
            out = {"exit_status": EXIT_UNREACHABLE, "verdict": f"UNREACHABLE: {exc}"}
            print(json.dumps({**out, "base_url": args.base_url}))
        else:
            print(f"Sluice stream doctor: {args.base_url}\n\nUNREACHABLE: {exc}")
        return EXIT_UNREACHABLE
    d = diagnose(m)
    if args.json:
        print(json.dumps({**d.to_json(), "measurement": m.to_json()}, indent=2))
        return d.status
    print(render(m.url, d))
    return d.status


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    ) or [first]


def render(url: str, d: Diagnosis) -> str:
    """The report an operator reads."""
    out = [f"Sluice stream doctor: {url}", ""]
    for fact in d.facts:
        out += _wrap(fact, "  ", "      ")
    out.append("")
    out += _wrap(d.verdict, "", "  ")
    if d.status and d.suspects:
        out += ["", "Likely culprits (from the response headers, likeliest first):"]
        for n, s in enumerate(d.suspects, 1):
            out += _wrap(s.evidence, f"  {n}. ", "     ")
            out += _wrap(f"fix: {s.fix}", "     ", "       ")
    elif d.status:
        out.append("")
        out += _wrap(
            "Likely culprit: nothing in the response names it: an unannounced proxy (a "
            "corporate proxy, antivirus HTTPS scanning, a load balancer). Run the doctor from "
            "another network, and on the server against Sluice's own address, to find the "
            "hop that buffers.",
            "",
            "  ",
        )
    if d.notes:
        out.append("")
    for note in d.notes:
        out += _wrap(f"Note: {note}", "", "  ")
    if d.status or d.notes:
        out += ["", f"See {DOCS}."]
    return "\n".join(out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
