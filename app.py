"""Sluice: a Flask (WSGI) backend that streams LLM completions over Server-Sent Events.

`create_app(settings)` builds everything. gunicorn loads ``app:app``; that
attribute is created on first access (PEP 562), so importing this module opens
nothing, and under gunicorn it is built inside each worker after gevent's
monkey-patching, never before.
"""

from __future__ import annotations

import redis
from flask import Flask
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.middleware.proxy_fix import ProxyFix

from config.settings import Settings, load_settings
from streaming.core.manager import StreamManager
from streaming.logs import configure_logging, install_request_log
from streaming.redis_conn import RedisGate, connect
from streaming.upstream.routing import Router
from streaming.web import api, openai_compat, ops, sessions_api, signin, usage_api
from streaming.web.body_deadline import BodyDeadline
from streaming.web.context import Sluice
from streaming.web.cors import init_cors
from streaming.web.diagnostics import bp as diagnostics_bp
from streaming.web.errors import install_error_handlers
from streaming.web.limits import init_limits

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    if not settings.redis_url:
        raise RuntimeError(
            "REDIS_URL is not set (gunicorn -c config/gunicorn.conf.py starts an embedded "
            "redis-server in development)"
        )
    configure_logging()

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["SECRET_KEY"] = settings.secret_key
    app.json.sort_keys = False

    redis_client = connect(
        settings.redis_url,
        socket_timeout=2,  # a frozen Redis fails a call after 2 s (BLPOP/XREAD block <= 1 s)
        socket_connect_timeout=2,
        health_check_interval=15,
        # One quick retry for a connection a Redis restart left stale; none on timeouts,
        # so a frozen Redis fails a request after socket_timeout instead of minutes of
        # redis-py's default exponential retries.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
    # the upstreams (one without UPSTREAMS_FILE), their clients and shared breaker
    gate = RedisGate()
    upstream = Router.from_settings(settings, redis_client, gate)
    manager = StreamManager(redis_client, settings, upstream, gate)
    app.extensions["sluice"] = Sluice(settings, redis_client, upstream, manager)

    if settings.trusted_proxies:
        # Believe exactly that many X-Forwarded-For (and -Proto) hops (nginx.conf: 1), no more.
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)
    # request bodies arrive within 10 s (408) and malformed ones are a 400, never a 500
    app.wsgi_app = BodyDeadline(app.wsgi_app)
    install_error_handlers(app)  # first: its fail-fast hook runs before the limiter's
    init_limits(app, redis_client)
    install_request_log(app)
    init_cors(app, settings.cors_origins)  # its after_request hooks run before the others
    app.register_blueprint(api.bp)
    app.register_blueprint(sessions_api.bp)
    app.register_blueprint(usage_api.bp)
    app.register_blueprint(signin.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(openai_compat.bp)
    app.register_blueprint(diagnostics_bp)  # no credential needed (API.md §12)
    return app


def __getattr__(name: str) -> Flask:
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
