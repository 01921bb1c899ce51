"""WSGI entry point.

    gunicorn -k iwsproxy.gunicorn.Worker wsgi:app
    gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker wsgi:app   (works too)
    python wsgi.py

All read their settings from IWSPROXY_* environment variables.
"""

import logging

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()  # first thing, before anything imports socket or ssl
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
else:  # under gunicorn: log through gunicorn's error log, at its level
    _gunicorn = logging.getLogger("gunicorn.error")
    if _gunicorn.handlers:
        logging.getLogger("iwsproxy").handlers = _gunicorn.handlers
        logging.getLogger("iwsproxy").setLevel(_gunicorn.level)

from iwsproxy.io.server import tune_process  # noqa: E402

tune_process()  # this process is the proxy's own: see tune_process

from iwsproxy import create_app  # noqa: E402

app = create_app()

if __name__ == "__main__":
    from iwsproxy.io.server import serve_forever

    settings = app.extensions["iwsproxy"].settings
    serve_forever(app, settings.bind_address, ready=lambda port: print(f"LISTENING {port}", flush=True))
