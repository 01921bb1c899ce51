"""The proxy app served with geventwebsocket's stock handler: a misconfiguration, on purpose."""

from gevent import monkey

monkey.patch_all()

from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from iwsproxy import Settings, create_app  # noqa: E402

if __name__ == "__main__":
    server = WSGIServer(("127.0.0.1", 0), create_app(Settings.load(backends=("ws://127.0.0.1:9",))),
                        handler_class=WebSocketHandler, log=None)
    server.start()
    print(f"LISTENING {server.address[1]}", flush=True)
    server.serve_forever()
