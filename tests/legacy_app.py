"""A small "legacy" Flask app with its own routes and sessions, with iwsproxy mounted into it."""

from flask import Flask, jsonify, request, session

from iwsproxy import IWSProxy

app = Flask(__name__)
app.secret_key = "legacy-secret"
app.config["IWSPROXY_PROXY_PREFIX"] = "/ws"
app.config["IWSPROXY_ADMIN_PREFIX"] = "/ops"
app.config["IWSPROXY_ADMIN_TOKEN"] = "legacy-token"
proxy = IWSProxy()
proxy.init_app(app)


@app.get("/")
def index():
    return "legacy home"


@app.post("/login")
def login():
    session["user"] = request.form.get("user", "anonymous")
    return jsonify(user=session["user"])


@app.get("/me")
def me():
    return jsonify(user=session.get("user"))


@app.post("/deploy/backends")
def register_backend():
    """The app's own admin route registers a backend through the library API."""
    added = IWSProxy.manager().add_backend(request.get_json()["url"])
    return jsonify(added=added), 201 if added else 200
