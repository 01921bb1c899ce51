"""A gunicorn config for running iwsproxy under gunicorn in scripts, tests and the benchmark.

    gunicorn -k iwsproxy.gunicorn.Worker -c python:iwsproxy.gunicorn_conf wsgi:app

Binding to port 0 is fine: once the workers can be started, ``LISTENING <port>``
is printed on stdout, which :class:`iwsproxy.tools.process.ChildProcess` waits for.
"""

graceful_timeout = 10


def when_ready(server):
    port = server.LISTENERS[0].sock.getsockname()[1]
    print(f"LISTENING {port}", flush=True)


def child_exit(server, worker):
    """A worker is gone: with PROMETHEUS_MULTIPROC_DIR set, its gauges stop counting (counters stay)."""
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
