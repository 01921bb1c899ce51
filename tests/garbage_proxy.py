"""``iwsproxy serve`` whose cyclic garbage collector keeps what it finds, for leak tests.

    PYTHONPATH=.:tests python -m garbage_proxy    (settings from IWSPROXY_* variables)

The collector runs with ``gc.DEBUG_SAVEALL``: an object that only the cyclic collector could
free (it was in a reference cycle when it died) is kept in ``gc.garbage`` instead. What
reference counting frees is freed as usual. ``GET /garbage`` runs a full collection and
answers what was kept, counted by type (``module.qualname``), with the allocator's blocks in
use (``sys.getallocatedblocks()``, which then includes the kept garbage) and the number of
objects the collector tracks. A session that ends in a reference cycle thus stays visible,
with its memory, until the process exits. Prints ``LISTENING <port>`` once it listens.
"""

from gevent import monkey

monkey.patch_all()  # first thing, before anything imports socket or ssl

import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402

from flask import jsonify  # noqa: E402

from iwsproxy import create_app  # noqa: E402
from iwsproxy.io.server import serve_forever, tune_process  # noqa: E402
from iwsproxy.settings import Settings  # noqa: E402


def garbage():
    gc.collect()
    kept = Counter(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in gc.garbage)
    return jsonify(types=dict(kept), kept=len(gc.garbage), allocated_blocks=sys.getallocatedblocks(),
                   gc_objects=len(gc.get_objects()))


def main() -> None:
    tune_process()
    gc.set_debug(gc.DEBUG_SAVEALL)
    settings = Settings.load(env=os.environ)
    app = create_app(settings)
    app.add_url_rule("/garbage", view_func=garbage)
    serve_forever(app, settings.bind_address, ready=lambda port: print(f"LISTENING {port}", flush=True))


if __name__ == "__main__":
    main()
