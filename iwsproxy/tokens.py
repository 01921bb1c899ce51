"""Resume tokens: proof that a connection may resume or take over a session.  [pure]

Client ids become credentials once sessions can be taken over. With a
configured secret, the application that hands out client ids also hands out
``sign(secret, client_id)``; a connection that resumes or takes over a live
session must present it (``?token=`` or the ``X-Iwsproxy-Token`` header).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["sign", "verify"]


def sign(secret: str, client_id: str) -> str:
    return hmac.new(secret.encode(), client_id.encode(), hashlib.sha256).hexdigest()


def verify(secret: str, client_id: str, token: str | None) -> bool:
    """Is ``token`` the signature of ``client_id``? Compared as bytes: ``compare_digest`` refuses
    two strings with a non-ASCII character in them, and a client may send anything."""
    if not token:
        return False
    return hmac.compare_digest(sign(secret, client_id).encode(), token.encode("utf-8", "surrogateescape"))
