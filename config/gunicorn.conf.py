"""gunicorn settings for Sluice: ``gunicorn -c config/gunicorn.conf.py app:app``.

gevent workers (one greenlet per connection; a stream costs a few KB, not a
thread), bound to loopback (nginx in front) or ``BIND``. No preload: the app,
its Redis pool and its upstream client are built in each worker after
gevent's monkey-patching. Settings are validated here, in the master, so a
bad value stops the process with one line before any worker starts.
"""

import multiprocessing
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import devservices  # noqa: E402
from config.settings import SettingsError, load_settings  # noqa: E402

try:
    _settings = load_settings()
except SettingsError as exc:
    sys.stderr.write(f"sluice: {exc}\n")
    sys.exit(2)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        sys.stderr.write(f"sluice: invalid setting {name}: a whole number of at least 1\n")
        sys.exit(2)
    return int(raw)


worker_class = "gevent"
bind = os.environ.get("BIND") or f"127.0.0.1:{_int_env('PORT', 8000)}"
workers = _int_env("WEB_CONCURRENCY", multiprocessing.cpu_count())
worker_connections = _int_env("WORKER_CONNECTIONS", 2000)
# Streams are long: on SIGTERM/SIGHUP a worker lets them run this long, then
# ends the rest with an `interrupted` error and `done` (see post_worker_init).
graceful_timeout = _int_env("GRACEFUL_TIMEOUT", 30)
timeout = 30  # worker heartbeat to the master; gevent workers notify every second
keepalive = 5
preload_app = False
accesslog = os.environ.get("ACCESS_LOG") or None  # the app logs each request as JSON
# one line, not a traceback, for a client dropped by SEND_TIMEOUT_SECONDS
logger_class = "streaming.gunicorn_log.SluiceLogger"
forwarded_allow_ips = "127.0.0.1,::1"
SHUTDOWN_MARGIN = 3.0


def on_starting(server):
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics sums every worker: each writes its files here (fresh per master)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sluice-metrics-")
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = devservices.start_redis()
    if not (
        _settings.upstreams_file
        or os.environ.get("OPENAI_API_KEY")
        or os.environ.get("OPENAI_BASE_URL")
    ):
        os.environ["OPENAI_BASE_URL"] = devservices.start_simulator()


def on_exit(server):
    devservices.stop_all()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Watch for shutdown: give streams the graceful window, then interrupt the rest."""
    import gevent

    def watch():
        while worker.alive:
            gevent.sleep(0.25)
        from streaming.web.diagnostics import end_probe_streams

        end_probe_streams()  # the doctor's probe streams are not worth a graceful wait
        manager = worker.wsgi.extensions["sluice"].manager
        deadline = max(0.0, worker.cfg.graceful_timeout - SHUTDOWN_MARGIN)
        waited = 0.0
        while manager.local and waited < deadline:
            gevent.sleep(0.25)
            waited += 0.25
        manager.shutdown()

    gevent.spawn(watch)
