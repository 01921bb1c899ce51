"""The URL a backend is asked for: nginx's proxy_pass rule for the path, queries merged."""

import pytest

from iwsproxy.io.backend import backend_target


@pytest.mark.parametrize("url, path, query, expected", [
    ("ws://b:9", "/chat", "room=7", "ws://b:9/chat?room=7"),
    ("ws://b:9", "", "", "ws://b:9/"),
    ("ws://b:9", "/", "", "ws://b:9/"),
    ("ws://b:9", "/a%2Fb", "", "ws://b:9/a%2Fb"),
    ("ws://b:9/", "/chat", "room=7", "ws://b:9/?room=7"),
    ("ws://b:9/ws", "/chat", "", "ws://b:9/ws"),
    ("ws://b:9/ws?k=1", "/chat", "room=7", "ws://b:9/ws?k=1&room=7"),
    ("wss://b/ws?k=1", "/chat", "", "wss://b/ws?k=1"),
    ("ws://b:9?k=1", "/chat", "x=2", "ws://b:9/chat?k=1&x=2"),
])
def test_backend_target(url, path, query, expected):
    assert backend_target(url, path, query) == expected
