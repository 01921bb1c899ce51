"""Routes: parsing (every form a setting can take), validation, longest-prefix matching by segments."""

from __future__ import annotations

import pytest

from iwsproxy.exceptions import ConfigError
from iwsproxy.routes import has_dot_segment, match_route, parse_routes, pool_for_path, pool_seeds
from iwsproxy.settings import Settings

ROUTES = parse_routes("/chat=ws://a:1,ws://b:2;/chat/admin=ws://c:3;/=ws://d:4")


@pytest.mark.parametrize("path, expected", [
    ("/chat", "/chat"), ("/chat/", "/chat"), ("/chat/123", "/chat"),
    ("/chat/admin", "/chat/admin"), ("/chat/admin/x", "/chat/admin"), ("/chat/administrator", "/chat"),
    ("/chatroom", "/"), ("/chatroom/1", "/"), ("/", "/"), ("/other", "/"),
])
def test_the_longest_prefix_wins_by_whole_segments(path, expected):
    assert match_route(ROUTES, path) == expected


def test_a_path_under_no_route_matches_nothing():
    routes = parse_routes(["/chat=ws://a"])
    assert match_route(routes, "/chatroom") is None
    assert match_route(routes, "/") is None
    assert match_route(routes, "/cha") is None
    assert match_route((), "/chat") is None


@pytest.mark.parametrize("value", [
    "/chat=ws://a:1,ws://b:2;/news/=ws://c",
    ["/chat=ws://a:1, ws://b:2", "/news=ws://c"],
    [("/chat", ("ws://a:1", "ws://b:2")), ("/news/", "ws://c")],
    {"/chat": ["ws://a:1", "ws://b:2"], "/news": "ws://c"},
])
def test_every_form_of_the_setting_gives_the_same_routes(value):
    assert parse_routes(value) == (("/chat", ("ws://a:1", "ws://b:2")), ("/news", ("ws://c",)))


def test_the_flag_the_variable_and_replace_agree():
    from_env = Settings.load(env={"IWSPROXY_ROUTES": "/chat=ws://a:1,ws://b:2; /=ws://c"})
    from_cli = Settings.load(cli={"routes": ["/chat=ws://a:1,ws://b:2", "/=ws://c"]})
    assert from_env.routes == from_cli.routes == (("/chat", ("ws://a:1", "ws://b:2")), ("/", ("ws://c",)))
    assert from_env.replace(max_pipes=5).routes == from_env.routes
    assert Settings().routes == ()


@pytest.mark.parametrize("value, message", [
    ("chat=ws://a", "must start with /"),
    ("/chat", "is not PREFIX=URL"),
    ("/chat=", "has no backend URL"),
    ("/chat=http://a", "not a ws:// or wss:// URL"),
    ("/chat=ws://a:99999", "invalid URL"),
    ("/chat=ws://a;/chat/=ws://b", "given twice"),
    ("/chat?x=ws://a", "must be a path"),
])
def test_a_bad_route_is_a_config_error_naming_the_setting(value, message):
    with pytest.raises(ConfigError) as caught:
        Settings.load(env={"IWSPROXY_ROUTES": value})
    assert "IWSPROXY_ROUTES" in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("routes, extra, message", [
    ("/chat=ws://a", {"IWSPROXY_PROXY_PREFIX": "/ws"}, "not under IWSPROXY_PROXY_PREFIX"),
    ("/chat=ws://a;/=ws://b", {"IWSPROXY_BACKENDS": "ws://x"}, "both give the default pool"),
    ("/ws/chat=ws://a;/ws=ws://b", {"IWSPROXY_BACKENDS": "ws://x", "IWSPROXY_PROXY_PREFIX": "/ws"},
     "both give the default pool"),
    ("/chat=ws://a", {"IWSPROXY_WORKERS": "2"}, "need IWSPROXY_REDIS_URL"),
])
def test_routes_refuse_what_they_cannot_go_with(routes, extra, message):
    with pytest.raises(ConfigError) as caught:
        Settings.load(env={"IWSPROXY_ROUTES": routes, **extra})
    assert message in str(caught.value)


def test_routes_go_with_workers_sharing_redis():
    settings = Settings.load(env={"IWSPROXY_ROUTES": "/chat=ws://a", "IWSPROXY_WORKERS": "2",
                                  "IWSPROXY_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.workers == 2 and settings.routes == (("/chat", ("ws://a",)),)


def test_routes_go_with_backends_and_redis():
    settings = Settings.load(env={"IWSPROXY_ROUTES": "/chat=ws://a", "IWSPROXY_BACKENDS": "ws://x",
                                  "IWSPROXY_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.routes == (("/chat", ("ws://a",)),) and settings.backends == ("ws://x",)


@pytest.mark.parametrize("routes, backends, prefix, expected", [
    ((), (), "", {"default": ()}),
    ((), ("ws://x",), "", {"default": ("ws://x",)}),
    ((("/chat", ("ws://a",)),), (), "", {"/chat": ("ws://a",)}),  # no catch-all: no default pool
    ((("/chat", ("ws://a",)),), ("ws://x",), "", {"default": ("ws://x",), "/chat": ("ws://a",)}),
    ((("/chat", ("ws://a",)), ("/", ("ws://d",))), (), "", {"default": ("ws://d",), "/chat": ("ws://a",)}),
    ((("/ws/chat", ("ws://a",)), ("/ws", ("ws://d",))), (), "/ws", {"default": ("ws://d",), "/ws/chat": ("ws://a",)}),
])
def test_the_default_pool_is_the_catch_all(routes, backends, prefix, expected):
    seeds = pool_seeds(routes, backends, prefix)
    assert seeds == expected and list(seeds) == list(expected)  # the default pool first


@pytest.mark.parametrize("path, has_default, expected", [
    ("/chat/1", True, "/chat"), ("/chat/1", False, "/chat"),
    ("/chatroom", True, "default"), ("/chatroom", False, None),  # under no route: the catch-all or 404
    ("/", True, "default"), ("/", False, None),
])
def test_a_path_under_no_route_goes_to_the_default_pool_if_there_is_one(path, has_default, expected):
    routes = parse_routes("/chat=ws://a")
    assert pool_for_path(routes, path, has_default=has_default) == expected
    with_catch_all = parse_routes("/chat=ws://a;/=ws://d")
    assert pool_for_path(with_catch_all, path, has_default=True) == ("/chat" if expected == "/chat" else "default")


def test_routes_under_the_proxy_prefix_are_accepted():
    settings = Settings.load(env={"IWSPROXY_ROUTES": "/ws/chat=ws://a;/ws=ws://b", "IWSPROXY_PROXY_PREFIX": "/ws"})
    assert [prefix for prefix, _ in settings.routes] == ["/ws/chat", "/ws"]


@pytest.mark.parametrize("path, expected", [
    ("/chat/../admin", True), ("/chat/./x", True), ("/..", True), ("/chat/..", True),
    ("/chat/...", False), ("/chat/..x", False), ("/chat/x.y", False), ("/", False), ("/chat/", False),
])
def test_dot_segments(path, expected):
    assert has_dot_segment(path) is expected
