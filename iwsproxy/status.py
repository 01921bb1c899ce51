"""The status page: ``GET <admin prefix>/`` in a browser, behind the admin token.

The page is rendered on the server (the first paint needs no script), then
``static/iwsproxy/status.js`` refreshes its two tables every second from
``GET <admin prefix>/backends``, sending the token as ``Authorization: Bearer``.

A browser cannot send that header when it navigates, so the page (and only the
page) also accepts the token as ``?token=...``. The check itself is the admin
blueprint's ``before_request`` (:func:`iwsproxy.app._require_token`), which this
blueprint shares; it reads the credentials through :func:`presented_token`.
The token is rendered into the page for the script only after that check passed.
The script is served without a token: it is the same file for everyone and
holds no data.
"""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, render_template, request, url_for

import iwsproxy

__all__ = ["ASSETS_ENDPOINT", "PAGE_ENDPOINT", "presented_token", "status_bp"]

status_bp = Blueprint("iwsproxy_status", __name__, template_folder="templates",
                      static_folder="static", static_url_path="/static")
PAGE_ENDPOINT = "iwsproxy_status.page"
ASSETS_ENDPOINT = "iwsproxy_status.static"

# the page holds the admin token: not cached, not framed, no Referer, no foreign script
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; connect-src 'self'; "
                                "style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"),
}


def presented_token() -> tuple[str, str]:
    """``(scheme, credentials)`` of the current request.

    From the ``Authorization`` header; for the status page alone, a request
    without that header may give the token as ``?token=`` instead (a browser
    navigating to a page cannot send headers). Comparing is the caller's job.
    """
    given = request.headers.get("Authorization", "")
    if not given and request.endpoint == PAGE_ENDPOINT and "token" in request.args:
        return "bearer", request.args["token"]
    scheme, _, value = given.partition(" ")
    return scheme, value.strip()


@status_bp.get("/")
def page():
    """The status page; the token was checked by the admin ``before_request``."""
    manager = iwsproxy.IWSProxy.manager()
    html = render_template(
        "iwsproxy/status.html",
        backends=manager.backends(),
        pipes=manager.pipes(),
        token=presented_token()[1],
        backends_url=url_for("iwsproxy_admin.list_backends"),
        rendered_at=datetime.now(timezone.utc),
    )
    return html, 200, _PAGE_HEADERS
