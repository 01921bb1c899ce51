import pytest

from iwsproxy.tokens import sign, verify


def test_the_signature_of_the_id_verifies():
    assert verify("s3cret", "id-1", sign("s3cret", "id-1"))


@pytest.mark.parametrize("token", [None, "", "0" * 64, sign("other", "id-1"), sign("s3cret", "id-2"),
                                   "\u00e9", "\u00ff" * 64, "\udcff", sign("s3cret", "id-1") + "\u00e9"])
def test_anything_else_is_refused_without_an_error(token):
    assert verify("s3cret", "id-1", token) is False  # a client may send any bytes: refused, never a 500
