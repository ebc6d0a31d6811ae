"""The common design, for comparison: the usual blog-post Flask "StreamManager".

This is a faithful copy of the pattern most tutorials show for streaming LLM
answers from Flask and cancelling them, kept here only to be measured next to
Sluice under the same gunicorn + gevent (2 workers):

- a ``StreamManager`` holding a per-process dict of active streams (stream id
  -> cancelled flag) behind a lock;
- the openai SDK's typed stream, ``client.chat.completions.create(stream=True)``,
  iterated chunk by chunk, each chunk re-serialized with
  ``yield f"data: {json.dumps(...)}\\n\\n"``;
- a ``DELETE`` that looks the id up in that local dict: on any other worker
  (or host) the stream is "not found" and keeps running;
- the cancel flag is checked between chunks, so a silent upstream is only
  stopped when its next chunk arrives; a client that leaves is only noticed
  when a write fails.

Run under gunicorn: ``gunicorn -k gevent -w 2 bench.common_design:app`` (the
upstream comes from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, as the SDK reads
them). ``python -m bench.common_design [--quick]`` runs its comparison rows
alone (relay CPU, the load row at 200 streams x 50 tokens/s, cross-worker
cancel); the suite (``python -m bench``) runs them beside Sluice's.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

from flask import Flask, Response, jsonify, request, stream_with_context
from openai import OpenAI

if __name__ == "__main__":  # running the comparison rows, not serving: no upstream here
    os.environ.setdefault("OPENAI_API_KEY", "sk-unused")

app = Flask(__name__)
client = OpenAI()  # OPENAI_API_KEY / OPENAI_BASE_URL from the environment


class StreamManager:
    """Keeps track of active streams so that they can be cancelled."""

    def __init__(self):
        self.active_streams = {}
        self.lock = threading.Lock()

    def create_stream(self, stream_id):
        with self.lock:
            self.active_streams[stream_id] = {"cancelled": False, "created_at": time.time()}

    def cancel_stream(self, stream_id):
        with self.lock:
            if stream_id in self.active_streams:
                self.active_streams[stream_id]["cancelled"] = True
                return True
            return False

    def is_cancelled(self, stream_id):
        with self.lock:
            stream = self.active_streams.get(stream_id)
            return stream is not None and stream["cancelled"]

    def remove_stream(self, stream_id):
        with self.lock:
            self.active_streams.pop(stream_id, None)


stream_manager = StreamManager()


@app.route("/health")
def health():
    return jsonify({"status": "ok"})


@app.route("/api/v1/completions/stream", methods=["POST"])
def stream_completion():
    data = request.get_json()
    prompt = data.get("prompt", "")
    model = data.get("model", "gpt-4o-mini")
    stream_id = str(uuid.uuid4())
    stream_manager.create_stream(stream_id)

    def generate():
        try:
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                stream=True,
            )
            yield f"data: {json.dumps({'type': 'start', 'stream_id': stream_id})}\n\n"
            for chunk in response:
                if stream_manager.is_cancelled(stream_id):
                    response.close()
                    yield f"data: {json.dumps({'type': 'cancelled'})}\n\n"
                    break
                if chunk.choices and chunk.choices[0].delta.content:
                    content = chunk.choices[0].delta.content
                    yield f"data: {json.dumps({'type': 'token', 'content': content})}\n\n"
            yield f"data: {json.dumps({'type': 'done'})}\n\n"
        except Exception as e:
            yield f"data: {json.dumps({'type': 'error', 'error': str(e)})}\n\n"
        finally:
            stream_manager.remove_stream(stream_id)

    return Response(
        stream_with_context(generate()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Stream-ID": stream_id},
    )


@app.route("/api/v1/completions/stream/<stream_id>", methods=["DELETE"])
def cancel_stream(stream_id):
    if stream_manager.cancel_stream(stream_id):
        return jsonify({"status": "cancelled", "stream_id": stream_id})
    return jsonify({"error": "Stream not found"}), 404


def main() -> int:
    """Run the common design's comparison rows alone (the suite runs them beside Sluice's)."""
    import argparse

    from bench import cancel, load, relay_cpu

    parser = argparse.ArgumentParser(description="the common design's comparison rows")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(relay_cpu.run(kinds=("common",), quick=args.quick)["markdown"])
    print(load.run(quick=args.quick, kinds=("common",))["markdown"])
    print(cancel.run(quick=args.quick, kinds=("common",))["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
