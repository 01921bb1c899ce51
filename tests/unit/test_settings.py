"""Settings: sizes, layers, and a clear ConfigError for every value that would break the proxy later."""

from __future__ import annotations

import pytest

from iwsproxy.exceptions import ConfigError
from iwsproxy.settings import Settings, cpu_count, describe, parse_size


@pytest.mark.parametrize("text, size", [
    ("65536", 65536), (123, 123), ("64KiB", 65536), ("5MiB", 5 * 1024 * 1024), ("10kB", 10_000),
    ("1.5 MiB", 1572864), ("2g", 2_000_000_000), ("0", 0),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5 MiBs", "-1", "1e3", True])
def test_sizes_that_are_not(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_layers_defaults_config_environment_command_line_arguments():
    assert Settings.load().buffer_limit_bytes == 5 * 1024 * 1024
    config = {"IWSPROXY_BUFFER_LIMIT": "1MiB", "IWSPROXY_KEEPALIVE": "7"}
    env = {"IWSPROXY_BUFFER_LIMIT": "2MiB", "IWSPROXY_POOL_POLICY": "exclusive"}
    settings = Settings.load(config=config, env=env, cli={"buffer_limit_bytes": "3MiB"})
    assert (settings.buffer_limit_bytes, settings.keepalive_s, settings.pool_policy) == (3 * 1024**2, 7.0, "exclusive")
    assert Settings.load(env=env, buffer_limit_bytes=4096).buffer_limit_bytes == 4096
    assert settings.replace(keepalive_s=0).keepalive_s == 0.0


def test_an_invalid_value_names_its_key_value_and_source():
    with pytest.raises(ConfigError) as error:
        Settings.load(config={"IWSPROXY_KEEPALIVE": "soon"})
    assert "IWSPROXY_KEEPALIVE" in str(error.value) and "soon" in str(error.value)
    assert "Flask config" in str(error.value)
    with pytest.raises(ConfigError, match="environment"):
        Settings.load(env={"IWSPROXY_POOL_POLICY": "random"})
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load(buffer_limit=1)


@pytest.mark.parametrize("value", ["", "  ", "maybe"])
def test_a_switch_set_to_nothing_is_refused_not_turned_off(value):
    # an unset ${VAR} in a compose file must not turn certificate checks off in silence
    with pytest.raises(ConfigError, match="IWSPROXY_BACKEND_TLS_VERIFY"):
        Settings.load(env={"IWSPROXY_BACKEND_TLS_VERIFY": value})
    assert Settings.load(env={"IWSPROXY_BACKEND_TLS_VERIFY": "off"}).backend_tls_verify is False


def test_described_settings_mask_every_secret():
    settings = Settings.load(env={"IWSPROXY_ADMIN_TOKEN": "admin-secret", "IWSPROXY_RESUME_SECRET": "resume-secret",
                                  "IWSPROXY_REDIS_URL": "redis://user:redis-secret@127.0.0.1:6379/0"})
    described = {name: value for name, _, value, _ in describe(settings)}
    assert (described["admin_token"], described["resume_secret"]) == ("***", "***")
    assert described["redis_url"] == "redis://user:***@127.0.0.1:6379/0"
    assert "-secret" not in repr(described.values())
    assert describe(Settings.load(env={"IWSPROXY_REDIS_URL": "redis://127.0.0.1:6379"}))


@pytest.mark.parametrize("name", ["IWSPROXY_CONNECT_TIMEOUT", "IWSPROXY_BACKOFF_INITIAL"])
def test_a_timeout_that_would_fail_every_connection_is_refused(name):
    with pytest.raises(ConfigError, match=name):
        Settings.load(env={name: "0"})


@pytest.mark.parametrize("env", [
    {"IWSPROXY_BACKOFF_INITIAL": "2", "IWSPROXY_BACKOFF_MAX": "1"},
    {"IWSPROXY_EJECT_BASE": "10", "IWSPROXY_EJECT_MAX": "5"},
    {"IWSPROXY_BIND": "8080"},
    {"IWSPROXY_KEEPALIVE": "-1"},
    {"IWSPROXY_MAX_PIPES": "0"},
    {"IWSPROXY_RESUME_GRACE": "inf"},
    {"IWSPROXY_DRAIN_WINDOW": "nan"},
    {"IWSPROXY_DRAIN_WINDOW": "1e16"},
])
def test_inconsistent_or_out_of_range_values_are_refused(env):
    with pytest.raises(ConfigError):
        Settings.load(env=env)


def test_zero_turns_off_what_its_help_says_it_turns_off():
    settings = Settings.load(env={"IWSPROXY_KEEPALIVE": "0", "IWSPROXY_RESUME_GRACE": "0", "IWSPROXY_PARK_AFTER": "0",
                                  "IWSPROXY_HANDSHAKE_TIMEOUT": "0", "IWSPROXY_PONG_TIMEOUT": "0"})
    assert (settings.keepalive_s, settings.resume_grace_s, settings.park_after_s) == (0.0, 0.0, 0.0)
    assert (settings.handshake_timeout_s, settings.pong_timeout_s) == (0.0, 0.0)


def test_the_header_size_cap_is_a_size_above_zero():
    assert Settings.load().max_header_size_bytes == 32 * 1024
    assert Settings.load(env={"IWSPROXY_MAX_HEADER_SIZE": "8KiB"}).max_header_size_bytes == 8192
    with pytest.raises(ConfigError, match="IWSPROXY_MAX_HEADER_SIZE"):
        Settings.load(env={"IWSPROXY_MAX_HEADER_SIZE": "0"})


def test_no_per_ip_limit_by_default_and_zero_means_none():
    assert Settings().max_pipes_per_ip == 0
    assert Settings.load(env={"IWSPROXY_MAX_PIPES_PER_IP": "0"}).max_pipes_per_ip == 0
    assert Settings.load(env={"IWSPROXY_MAX_PIPES_PER_IP": "50"}).max_pipes_per_ip == 50
    with pytest.raises(ConfigError):
        Settings.load(env={"IWSPROXY_MAX_PIPES_PER_IP": "-1"})


@pytest.mark.parametrize("env, key", [
    ({"IWSPROXY_GLOBAL_BUFFER_LIMIT": "1MiB"}, "IWSPROXY_GLOBAL_BUFFER_LIMIT"),
    ({"IWSPROXY_GLOBAL_BUFFER_LIMIT": "1MiB", "IWSPROXY_DELIVERY": "at-most-once"}, "IWSPROXY_GLOBAL_BUFFER_LIMIT"),
    ({"IWSPROXY_BUFFER_LIMIT": "1"}, "IWSPROXY_BUFFER_LIMIT"),
    ({"IWSPROXY_BUFFER_LIMIT": "0", "IWSPROXY_DELIVERY": "at-most-once"}, "IWSPROXY_BUFFER_LIMIT"),  # resume on
])
def test_buffers_that_could_not_hold_a_message_for_a_live_peer_are_refused(env, key):
    with pytest.raises(ConfigError, match=key):
        Settings.load(env=env)


def test_buffers_that_hold_nothing_for_a_live_peer_may_be_small():
    # at-most-once without resume holds only what waits for a backend that is not there
    settings = Settings.load(env={"IWSPROXY_DELIVERY": "at-most-once", "IWSPROXY_RESUME_GRACE": "0",
                                  "IWSPROXY_BUFFER_LIMIT": "0", "IWSPROXY_GLOBAL_BUFFER_LIMIT": "1KiB"})
    assert (settings.buffer_limit_bytes, settings.global_buffer_limit_bytes) == (0, 1024)
    assert Settings.load(env={"IWSPROXY_GLOBAL_BUFFER_LIMIT": "64KiB", "IWSPROXY_MAX_MESSAGE_SIZE": "64KiB",
                              "IWSPROXY_BUFFER_LIMIT": "2"})


@pytest.mark.parametrize("value, expected", [("3", 3), ("auto", cpu_count())])
def test_workers_setting(value, expected):
    assert Settings.load(cli={"workers": value}).workers == expected


@pytest.mark.parametrize("value", ["0", "-1", "many", True])
def test_workers_setting_refuses(value):
    with pytest.raises(ConfigError, match="IWSPROXY_WORKERS"):
        Settings.load(cli={"workers": value})
