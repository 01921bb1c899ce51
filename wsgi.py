"""WSGI entry point.

    gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker wsgi:app
    python wsgi.py

Both read their settings from IWSPROXY_* environment variables.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()  # first thing, before anything imports socket or ssl

from iwsproxy import create_app  # noqa: E402

app = create_app()

if __name__ == "__main__":
    import logging

    from iwsproxy.io.server import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = app.extensions["iwsproxy"].settings
    serve_forever(app, settings.bind_address, ready=lambda port: print(f"LISTENING {port}", flush=True))
