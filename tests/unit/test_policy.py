import pytest

from iwsproxy.io.backend import url_allowed
from iwsproxy.policy import FailureLimiter, origin_allowed


@pytest.mark.parametrize("origin, host, allowed, expected", [
    (None, "proxy:8080", (), True),
    ("http://proxy:8080", "proxy:8080", (), True),
    ("http://evil.test", "proxy:8080", (), False),
    ("http://proxy:9090", "proxy:8080", (), False),
    ("https://app.example.com", "proxy", ("https://app.example.com",), True),
    ("http://app.example.com", "proxy", ("https://app.example.com",), False),
    ("https://a.example.com", "proxy", ("https://*.example.com",), True),
    ("https://a.b.example.com", "proxy", ("https://*.example.com",), True),
    ("https://example.com", "proxy", ("https://*.example.com",), False),
    ("https://evilexample.com", "proxy", ("https://*.example.com",), False),
    ("https://app.example.com:8443", "proxy", ("https://app.example.com",), False),
    ("https://app.example.com:8443", "proxy", ("https://app.example.com:8443",), True),
    ("null", "proxy", ("https://app.example.com",), False),
    ("null", "proxy", ("*",), True),
    ("http://anything", "proxy", ("*",), True),
    ("http://app.example.com", "proxy", ("app.example.com",), True),
    ("http://[::1]:8080", "[::1]:8080", (), True),  # the proxy's own origin, over IPv6
    ("http://[::2]:8080", "[::1]:8080", (), False),
])
def test_origin_policy(origin, host, allowed, expected):
    assert origin_allowed(origin, host, allowed, allow_missing=True) is expected


def test_missing_origin_follows_the_setting():
    assert origin_allowed(None, "proxy", (), allow_missing=False) is False


def test_failure_limiter_blocks_then_forgets():
    limiter = FailureLimiter(3, window_s=60)
    for t in (0, 1, 2):
        assert limiter.blocked("ip", t) == 0
        limiter.failed("ip", t)
    assert limiter.blocked("ip", 3) == 57
    assert limiter.blocked("other", 3) == 0
    assert limiter.blocked("ip", 60.5) == 0


def test_failure_limiter_memory_is_bounded():
    limiter = FailureLimiter(1, max_keys=10)
    for i in range(100):
        limiter.failed(f"ip{i}", 0)
    assert len(limiter._failures) == 10


@pytest.mark.parametrize("url, allowlist, expected", [
    ("ws://10.0.0.5:9000/x", (), True),
    ("ws://10.0.0.5:9000/x", ("10.0.0.0/24",), True),
    ("ws://10.0.1.5:9000/x", ("10.0.0.0/24",), False),
    ("ws://backend.internal/x", ("backend.internal",), True),
    ("ws://backend.internal:9000/x", ("backend.internal:9000",), True),
    ("ws://backend.internal:9001/x", ("backend.internal:9000",), False),
    ("wss://backend.internal/x", ("backend.internal:443",), True),
    ("ws://169.254.169.254/", ("10.0.0.0/8", "backend.internal"), False),
    ("ws://[::1]:9000/x", ("::1",), True),
    ("ws://[2001:db8::5]/x", ("2001:db8::5",), True),
    ("ws://[2001:db8::5]/x", ("2001:db8::6",), False),
    ("ws://[::1]:9000/x", ("[::1]:9000",), True),
    ("ws://[::1]:9001/x", ("[::1]:9000",), False),
    ("ws://[::1]:9000/x", ("[::1]",), True),
    ("ws://[2001:db8::5]/x", ("2001:db8::/32",), True),
])
def test_backend_allowlist(url, allowlist, expected):
    assert url_allowed(url, allowlist) is expected
