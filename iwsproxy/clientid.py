"""Where a client's id comes from, and the cookie that hands out a new one.  [pure]

A source is ``path`` (the path's last segment), ``query:NAME``, ``header:NAME`` or
``cookie:NAME`` (see the ``client_id_from`` setting). :func:`find_client_id` looks in each
configured source and returns the one id the request carries, None if it carries none, or
raises :class:`ValueError` (answered 400 before the upgrade) when the request is ambiguous or
malformed: values that disagree, an oversized value, a malformed cookie.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping

__all__ = ["DEFAULT_COOKIE", "MAX_ID_LENGTH", "parse_source", "find_client_id", "new_client_id",
           "id_cookie", "cookie_name"]

DEFAULT_COOKIE = "iwsproxy_id"  # the cookie an assigned id is set in when no cookie source names one
MAX_ID_LENGTH = 256            # longer: 400, whatever the source
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 7230 token: a cookie or header name
_COOKIE_VALUE = re.compile(r'[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*')  # RFC 6265 cookie-octet*
_KINDS = ("path", "query", "header", "cookie")


def parse_source(text: str) -> str:
    """A source in canonical form (``path``, ``query:NAME``, ``header:Name``, ``cookie:NAME``);
    ValueError for anything else."""
    kind, colon, name = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS:
        raise ValueError(f"{text!r}: expected path, query:NAME, header:NAME or cookie:NAME")
    if kind == "path":
        if colon:
            raise ValueError(f"{text!r}: path takes no name")
        return "path"
    name = name.strip()
    if not name or (kind != "query" and not _TOKEN.fullmatch(name)):
        raise ValueError(f"{text!r}: {kind} needs a name (a token)")
    return f"{kind}:{name}"


def cookie_name(sources: Iterable[str]) -> str:
    """The cookie an assigned id goes in: the first ``cookie:NAME`` source's, else :data:`DEFAULT_COOKIE`."""
    for source in sources:
        if source.startswith("cookie:"):
            return source.partition(":")[2]
    return DEFAULT_COOKIE


def _cookies(header: str, name: str) -> list[str]:
    """The values of every cookie called ``name`` in a ``Cookie`` header (RFC 6265 5.4 syntax);
    ValueError if one of them is not a valid cookie value."""
    values = []
    for pair in header.split(";"):
        key, eq, value = pair.strip().partition("=")
        if key.strip() != name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if not eq or not _COOKIE_VALUE.fullmatch(value):
            raise ValueError(f"the {name} cookie is malformed")
        values.append(value)
    return values


def find_client_id(sources: Iterable[str], *, path: str, query: Mapping[str, list[str]],
                   headers: Mapping[str, list[str]], cookie_header: str) -> str | None:
    """The client id the request carries in ``sources``, or None if it carries none.

    ``path`` is the decoded request path, ``query`` maps a parameter name to its decoded values,
    ``headers`` maps a lower-case header name to its values, ``cookie_header`` is the ``Cookie``
    header. An empty value counts as none. Raises ValueError if values disagree (two sources,
    or one source twice), if one is over :data:`MAX_ID_LENGTH` characters, or if an id cookie
    is malformed.
    """
    found: list[tuple[str, str]] = []
    for source in sources:
        kind, _, name = source.partition(":")
        if kind == "path":
            values = [path.rpartition("/")[2]]
        elif kind == "query":
            values = list(query.get(name, ()))
        elif kind == "header":
            values = list(headers.get(name.lower(), ()))
        else:
            if len(cookie_header) > 64 * 1024:
                raise ValueError("the Cookie header is oversized")
            values = _cookies(cookie_header, name)
        for value in values:
            if len(value) > MAX_ID_LENGTH:
                raise ValueError(f"the client id in {source} is oversized (over {MAX_ID_LENGTH} characters)")
            if value:
                found.append((source, value))
    distinct = {value for _, value in found}
    if len(distinct) > 1:
        places = sorted({source for source, _ in found})
        raise ValueError("the request carries client ids that disagree (in " + ", ".join(places) + ")")
    return found[0][1] if found else None


def new_client_id() -> str:
    """A fresh random id: a version 4 UUID (122 random bits from ``os.urandom``)."""
    return str(uuid.uuid4())


def id_cookie(name: str, client_id: str, *, secure: bool, path: str = "/") -> str:
    """The ``Set-Cookie`` value that gives a client its assigned id: HttpOnly (page scripts never
    see it), SameSite=Strict (no other site's page can open a connection that carries it, so none
    can take the session over), Secure when the request came over TLS."""
    return f"{name}={client_id}; Path={path or '/'}; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
