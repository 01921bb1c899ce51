"""Where a client id is read, and when a request is refused for it."""

import pytest

from iwsproxy.clientid import DEFAULT_COOKIE, MAX_ID_LENGTH, cookie_name, find_client_id, id_cookie, parse_source
from iwsproxy.exceptions import ConfigError
from iwsproxy.settings import Settings

ID, OTHER = "0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def find(sources, path="/", query=None, headers=None, cookie=""):
    return find_client_id(sources, path=path, query=query or {}, headers=headers or {}, cookie_header=cookie)


@pytest.mark.parametrize("text, canonical", [("path", "path"), (" Query:sid ", "query:sid"),
                                             ("header:X-Session", "header:X-Session"), ("cookie:sid", "cookie:sid")])
def test_sources(text, canonical):
    assert parse_source(text) == canonical


@pytest.mark.parametrize("text", ["", "body:x", "path:x", "cookie:", "cookie:a b", "header:a:b", "query"])
def test_sources_that_are_not(text):
    with pytest.raises(ValueError):
        parse_source(text)


def test_the_setting_names_the_bad_source():
    with pytest.raises(ConfigError, match="IWSPROXY_CLIENT_ID_FROM"):
        Settings.load(env={"IWSPROXY_CLIENT_ID_FROM": "cookie:sid,form:x"})
    assert Settings.load(env={"IWSPROXY_CLIENT_ID_FROM": "cookie:sid, query:sid"}).client_id_from == (
        "cookie:sid", "query:sid")
    assert Settings().client_id_from == ("path",) and not Settings().assign_client_id


def test_each_source():
    assert find(["path"], path=f"/chat/{ID}") == ID
    assert find(["query:sid"], query={"sid": [ID]}) == ID
    assert find(["header:X-Session"], headers={"x-session": [ID]}) == ID
    assert find(["cookie:sid"], cookie=f"a=1; sid={ID}; b=2") == ID
    assert find(["cookie:sid"], cookie=f'sid="{ID}"') == ID


def test_none_empty_or_elsewhere_is_none():
    assert find(["path"], path="/") is None
    assert find(["query:sid"], query={"sid": [""], "other": [ID]}) is None
    assert find(["cookie:sid"], cookie=f"sidx={ID}; xsid={ID}") is None


def test_the_same_id_in_two_places_is_one_id():
    assert find(["cookie:sid", "query:sid"], query={"sid": [ID]}, cookie=f"sid={ID}") == ID


@pytest.mark.parametrize("kwargs", [
    dict(query={"sid": [OTHER]}, cookie=f"sid={ID}"),          # two sources disagree
    dict(cookie=f"sid={ID}; sid={OTHER}"),                     # one cookie twice, different values
    dict(query={"sid": [ID, OTHER]}),                          # one parameter twice
])
def test_ids_that_disagree_are_refused(kwargs):
    with pytest.raises(ValueError, match="disagree"):
        find(["cookie:sid", "query:sid"], **kwargs)


@pytest.mark.parametrize("cookie", ['sid="abc', "sid=a b", "sid=a,b", "sid=a\\b", "sid", "sid=é"])
def test_a_malformed_id_cookie_is_refused(cookie):
    with pytest.raises(ValueError, match="malformed"):
        find(["cookie:sid"], cookie=cookie)


def test_a_malformed_cookie_of_another_name_is_not_ours_to_refuse():
    assert find(["cookie:sid"], cookie=f'theme="a b; sid={ID}') == ID


def test_an_oversized_id_is_refused_whatever_its_source():
    big = "a" * (MAX_ID_LENGTH + 1)
    for kwargs in (dict(cookie=f"sid={big}"), dict(query={"sid": [big]}), dict(headers={"x-id": [big]})):
        with pytest.raises(ValueError, match="oversized"):
            find(["cookie:sid", "query:sid", "header:X-Id"], **kwargs)
    with pytest.raises(ValueError, match="oversized"):
        find(["cookie:sid"], cookie="x=" + "y" * 70_000)


def test_the_assigned_ids_cookie():
    assert cookie_name(["path", "query:q", "cookie:sid", "cookie:two"]) == "sid"
    assert cookie_name(["query:q"]) == DEFAULT_COOKIE
    assert id_cookie("sid", ID, secure=False) == f"sid={ID}; Path=/; HttpOnly; SameSite=Strict"
    assert id_cookie("sid", ID, secure=True, path="/ws").endswith("; Path=/ws; HttpOnly; SameSite=Strict; Secure")
