"""Security defaults: loopback by default, credentials never stored, the optional API token, CORS closed.

kvlens records prompts; whoever can read /_kvlens/ can read them. So kvlens listens on 127.0.0.1 unless
told otherwise (and warns when told otherwise without a token), keeps no credential it relays, refuses
cross-origin reads of its API, and can require a token (`security.api_token`) on /_kvlens/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import cli
from proxy.config import load_settings
from proxy.store import SQLiteStore
from tests.servers import free_port, serve_in_thread
from tests.test_forward import kvlens, records
from tests.upstreams import ScriptedUpstream

SECRETS = {
    "authorization": "Bearer sk-live-SECRET-one",
    "x-api-key": "SECRET-two",
    "api-key": "SECRET-three",
    "cookie": "session=SECRET-four",
}
TOKEN = "t0ken-SECRET-five"
API_PATHS = ["/_kvlens/api/requests", "/_kvlens/api/sessions", "/_kvlens/api/stats", "/_kvlens/metrics",
             "/_kvlens/openapi.json", "/_kvlens/docs", "/_kvlens/"]  # fmt: skip


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(ScriptedUpstream(), server_header=False, date_header=False) as url:
        yield url


# ---- where kvlens listens --------------------------------------------------------------------------


def test_listens_on_loopback_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(environ={})
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8081)
    assert settings.security_api_token == ""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "(default 127.0.0.1:8081)" in capsys.readouterr().out


@pytest.mark.parametrize(("listen", "token", "warned"), [
    ("0.0.0.0:18081", "", True), ("192.0.2.7:18081", "", True), ("[::]:18081", "", True),
    ("0.0.0.0:18081", TOKEN, False), ("127.0.0.1:18081", "", False), ("[::1]:18081", "", False),
    ("localhost:18081", "", False),
])  # fmt: skip
def test_serve_warns_when_exposed_without_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, listen: str, token: str,
    warned: bool,
) -> None:
    import uvicorn

    ran: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.update(app=app, **options))
    monkeypatch.setenv("KVLENS_SECURITY_API_TOKEN", token)
    assert cli.main(["serve", "--listen", listen, "--db", str(tmp_path / "k.sqlite3"), "--upstream",
                     "http://127.0.0.1:9"]) == 0  # fmt: skip
    ran["app"].store.close()
    err = capsys.readouterr().err
    assert ("warning: listening on" in err) is warned, err
    assert TOKEN not in err  # the token itself is never printed
    assert ran["timeout_graceful_shutdown"] == 30.0  # shutdown.grace_s: in-flight requests get 30 s on SIGTERM


# ---- credentials are relayed, never kept -----------------------------------------------------------


def test_credentials_are_relayed_but_never_stored_or_exported(
    upstream: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with kvlens(upstream, tmp_path / "echo.sqlite3") as (url, _):
        echoed = httpx.get(url + "/v1/models", headers=SECRETS).json()  # the upstream gets them all, unchanged
    assert {k: v for k, v in echoed["headers"] if k in SECRETS} == SECRETS

    db = tmp_path / "k.sqlite3"
    with kvlens(upstream, db, security_api_token=TOKEN) as (url, app):
        with httpx.Client(timeout=30) as client:
            client.post(url + "/recorded/chat-nonstream", json={"model": "m"}, headers=SECRETS)
            assert client.get(url + "/gzip", headers=SECRETS).status_code == 200
            assert client.get(url + f"/_kvlens/api/requests?token={TOKEN}").status_code == 200
            bearer = {"authorization": f"Bearer {TOKEN}"}
            assert client.get(url + "/_kvlens/api/stats", headers=bearer).status_code == 200
        recs = records(app)
    assert len(recs) == 2  # /_kvlens/ calls are kvlens' own, never recorded
    for rec in recs:
        assert {name: rec.request_headers[name] for name in SECRETS} == dict.fromkeys(SECRETS, "[redacted]")
    export = tmp_path / "export.jsonl"
    assert cli.main(["export", "--db", str(db), "--format", "jsonl", "-o", str(export)]) == 0
    files = [export, *db.parent.glob(db.name + "*")]  # the database, its WAL and shared memory
    raw = b"".join(path.read_bytes() for path in files)
    for secret in ("SECRET-one", "SECRET-two", "SECRET-three", "SECRET-four", TOKEN):
        assert secret.encode() not in raw, f"{secret} found in {[p.name for p in files]}"
    assert b"[redacted]" in raw
    assert TOKEN not in capsys.readouterr().err


def test_health_never_shows_a_password_in_the_upstream_url(upstream: str, tmp_path: Path) -> None:
    with_password = upstream.replace("http://", "http://kvlens:SECRET-six@")
    with kvlens(with_password, tmp_path / "k.sqlite3") as (url, _):
        health = httpx.get(url + "/_kvlens/health").json()
    assert health["upstream"] == upstream and "SECRET" not in str(health)


def test_records_never_keep_a_password_from_the_upstream_url(upstream: str, tmp_path: Path) -> None:
    with_password = upstream.replace("http://", "http://kvlens:SECRET-six@")
    with kvlens(with_password, tmp_path / "k.sqlite3") as (url, app):
        assert httpx.get(url + "/v1/models").status_code == 200
        [rec] = records(app)
    assert rec.upstream == upstream


def test_errors_never_show_a_password_from_the_upstream_url(tmp_path: Path) -> None:
    with kvlens(f"http://kvlens:SECRET-seven@127.0.0.1:{free_port()}", tmp_path / "k.sqlite3") as (url, app):
        r = httpx.get(url + "/v1/models")  # nothing listens there: kvlens answers 502 naming the upstream
        [rec] = records(app)
    assert r.status_code == 502 and "cannot connect to upstream http://127.0.0.1:" in r.text
    assert "SECRET" not in r.text and rec.error is not None and "SECRET" not in rec.error.message


# ---- the API token -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    with kvlens(upstream, tmp_path_factory.mktemp("guard") / "k.sqlite3", security_api_token=TOKEN) as running:
        yield running


@pytest.mark.parametrize("path", API_PATHS)
def test_token_required_on_the_api(guarded: tuple[str, Any], path: str) -> None:
    url, _ = guarded
    with httpx.Client(timeout=30) as client:
        for headers, params in (({}, {}), ({"authorization": "Bearer wrong"}, {}), ({}, {"token": "wrong"}),
                                ({"authorization": TOKEN}, {}), ({"authorization": f"Basic {TOKEN}"}, {})):  # fmt: skip
            r = client.get(url + path, headers=headers, params=params)
            assert r.status_code == 401, (path, headers, params)
            assert r.headers["x-kvlens-error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["type"] == "authentication_error"
        assert client.get(url + path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get(url + path, headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
        assert client.get(url + path, params={"token": TOKEN}).status_code == 200


def test_token_leaves_health_static_files_and_proxied_traffic_open(guarded: tuple[str, Any]) -> None:
    url, _ = guarded
    with httpx.Client(timeout=30) as client:
        assert client.get(url + "/_kvlens/health").json()["status"] == "ok"  # container health checks
        assert client.get(url + "/_kvlens/static/app.js").status_code == 200
        assert client.get(url + "/_kvlens/static/style.css").status_code == 200
        assert client.get(url + "/_kvlens/static/nope.js").status_code == 404
        proxied = client.get(url + "/v1/models")  # the upstream's business, not kvlens'
        assert proxied.status_code == 200 and proxied.json()["path"] == "/v1/models"
        r = client.get(url + f"/_kvlens?token={TOKEN}")  # the redirect to the dashboard keeps the token
        assert r.status_code == 307 and r.headers["location"] == f"/_kvlens/?token={TOKEN}"


def test_no_token_no_guard(upstream: str, tmp_path: Path) -> None:
    with kvlens(upstream, tmp_path / "k.sqlite3") as (url, _):
        assert httpx.get(url + "/_kvlens/api/requests").status_code == 200


# ---- CORS is closed on /_kvlens/ --------------------------------------------------------------------


@pytest.mark.parametrize("path", [*API_PATHS, "/_kvlens/health", "/_kvlens/static/app.js", "/_kvlens/api/requests/x"])
def test_no_cross_origin_reads_of_the_api(upstream: str, tmp_path: Path, path: str) -> None:
    with kvlens(upstream, tmp_path / "k.sqlite3") as (url, _):
        with httpx.Client(timeout=30) as client:
            r = client.get(url + path, headers={"origin": "http://evil.example"})
            assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers
            pre = client.options(url + path, headers={"origin": "http://evil.example",
                                                      "access-control-request-method": "GET",
                                                      "access-control-request-headers": "authorization"})  # fmt: skip
    assert pre.status_code == 403 and pre.headers["x-kvlens-error"] == "cors_refused"
    assert not [h for h in pre.headers if h.lower().startswith("access-control-")], pre.headers


def test_preflights_to_proxied_paths_are_the_upstreams_business(upstream: str, tmp_path: Path) -> None:
    with kvlens(upstream, tmp_path / "k.sqlite3") as (url, _):
        r = httpx.options(url + "/v1/chat/completions", headers={"origin": "http://127.0.0.1:3000",
                                                                 "access-control-request-method": "POST"})  # fmt: skip
    assert r.status_code == 200 and r.json()["method"] == "OPTIONS"  # forwarded, as llama-server's web UI needs


def test_token_setting_is_documented_and_never_in_repr() -> None:
    settings = load_settings(environ={"KVLENS_SECURITY_API_TOKEN": TOKEN})
    assert settings.security_api_token == TOKEN
    assert TOKEN not in repr(settings)
    example = (Path(__file__).parent.parent / "configs" / "kvlens.example.toml").read_text()
    assert "[security]" in example and 'api_token = ""' in example


def test_stored_records_open_without_the_token(tmp_path: Path, upstream: str) -> None:
    """The token guards the HTTP API only: `kvlens requests` on the machine reads the file directly."""
    db = tmp_path / "k.sqlite3"
    with kvlens(upstream, db, security_api_token=TOKEN) as (url, app):
        httpx.get(url + "/v1/models")
        assert app.flush(10)
    store = SQLiteStore(db)
    try:
        assert store.count() == 1
    finally:
        store.close()
