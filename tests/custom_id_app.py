"""An app whose client ids are "user-<digits>", taken from the path by its own extractor."""

import re

from flask import Flask

from iwsproxy import IWSProxy


def user_id(segment: str, request) -> str:
    if not re.fullmatch(r"user-\d{1,12}", segment):
        raise ValueError("client ids look like user-123")
    return segment


app = Flask(__name__)
app.config["IWSPROXY_ADMIN_TOKEN"] = "custom-token"
IWSProxy(app, client_id=user_id)
