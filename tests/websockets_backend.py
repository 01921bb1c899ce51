"""A python-websockets server as a backend: ``python -m websockets_backend [NAME]``.

The library's own asyncio server (nothing of the proxy's): for each connection it first sends
``{"name", "path", "client_id", "cookie"}`` as JSON (the request target it got, query
included), then echoes every message. Prints ``LISTENING <port>`` once bound (see
:mod:`iwsproxy.tools.process`).
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve


async def handler(connection):
    headers = connection.request.headers
    await connection.send(json.dumps({"name": NAME, "path": connection.request.path,
                                      "client_id": headers.get("X-Iwsproxy-Client-Id"),
                                      "cookie": headers.get("Cookie")}))
    async for message in connection:
        await connection.send(message)


async def main():
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        await server.serve_forever()


NAME = sys.argv[1] if len(sys.argv) > 1 else "websockets"

if __name__ == "__main__":
    asyncio.run(main())
