"""Several kvlens replicas on one PostgreSQL database, as a team runs them behind a load balancer.

Two real kvlens servers (each `create_app` with `store.path = postgresql://...`, the path
`kvlens serve --db postgresql://...` takes) on their own ports, in front of one llama-server
emulator, with traffic split between them:

- every record written by either replica appears in both replicas' API (lists, single records with
  their bodies, sessions, stats) and in `kvlens requests --db postgresql://...`;
- with session affinity at the load balancer (the README's recipe: route on X-Session-Id, else
  X-OpenWebUI-Chat-Id), each conversation's analysis finds its predecessor;
- the documented limit: the prefix index and each conversation's last turn live in the replica's
  memory, so a conversation whose turns land on different replicas is analysed as starting over on
  the replica that has not seen it. Nothing is lost (both records are stored); only that one
  comparison is.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.app import KvlensApp, create_app, uvicorn_options
from proxy.cli import main
from proxy.config import load_settings
from proxy.emulator import EmulatorSettings, create_app as create_emulator
from tests.servers import free_port, serve_in_thread

CAPTURE = Path(__file__).parent / "fixtures" / "clients" / "opencode-1.18.33-two-turns.jsonl"


@pytest.fixture
def emulator() -> Iterator[str]:
    settings = EmulatorSettings(prompt_tps=200_000, gen_tps=2000, ctx=65536)
    with serve_in_thread(create_emulator(settings), server_header=False, date_header=False) as url:
        yield url


@contextlib.contextmanager
def replica(upstream: str, db_url: str) -> Iterator[tuple[str, KvlensApp]]:
    """One kvlens replica on a free port, its store opened from the URL as `--db` would."""
    port = free_port()
    settings = load_settings(
        environ={}, overrides={"upstream_url": upstream, "listen": f"127.0.0.1:{port}", "store_path": db_url}
    )
    app = create_app(settings)
    opts = uvicorn_options(settings)
    opts.pop("host")
    with serve_in_thread(app, **opts) as url:  # the lifespan closes the store on the way out
        yield url, app


@pytest.fixture
def replicas(emulator: str, postgres_url: str) -> Iterator[list[tuple[str, KvlensApp]]]:
    with replica(emulator, postgres_url) as a, replica(emulator, postgres_url) as b:
        yield [a, b]


def affinity(headers: dict[str, str], n: int) -> int:
    """The load balancer's choice: a stable hash of the conversation header (README recipe)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    key = lowered.get("x-session-id") or lowered.get("x-openwebui-chat-id") or ""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def opencode_first_turn() -> dict[str, Any]:
    return json.loads(CAPTURE.read_text().splitlines()[1])


def turn(client: httpx.Client, url: str, req: dict[str, Any], body: dict[str, Any], session: str) -> dict[str, Any]:
    headers = {k: v for k, v in req["headers"].items() if k.lower() not in ("host", "content-length")}
    headers["x-session-id"] = headers["x-session-affinity"] = session
    r = client.post(url + req["path"], headers=headers, json=dict(body, stream=False, max_tokens=24))
    assert r.status_code == 200, r.text
    return r.json()


def two_turns(client: httpx.Client, urls: tuple[str, str], session: str) -> None:
    """opencode's first turn on urls[0], then a healthy second turn (its own reply appended) on urls[1]."""
    req = opencode_first_turn()
    reply = turn(client, urls[0], req, req["body"], session)["choices"][0]["message"]
    second = copy.deepcopy(req["body"])
    second["messages"] += [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "and now?"}]
    turn(client, urls[1], req, second, session)


def flush(replicas: list[tuple[str, KvlensApp]]) -> None:
    for _, app in replicas:
        assert app.flush(20)


def test_records_from_both_replicas_appear_in_each_replicas_api(
    replicas: list[tuple[str, KvlensApp]], postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: dict[str, int] = {}  # session -> replica that served it
    with httpx.Client(timeout=60) as client:
        for n in range(8):  # round robin: the load balancer without affinity
            session = f"ses_replica_{n}"
            url = replicas[n % 2][0]
            body = {"model": "m", "messages": [{"role": "user", "content": f"question {n}"}], "max_tokens": 4}
            r = client.post(url + "/v1/chat/completions", json=body, headers={"x-session-id": session})
            assert r.status_code == 200
            sent[session] = n % 2
    flush(replicas)

    with httpx.Client(timeout=30) as client:
        seen = []
        for url, _ in replicas:
            listed = client.get(f"{url}/_kvlens/api/requests", params={"limit": 100}).json()["requests"]
            chats = [r for r in listed if r["path"] == "/v1/chat/completions"]
            assert {r["session"] for r in chats} == set(sent)
            seen.append([r["id"] for r in chats])
            for session, served_by in sent.items():
                if served_by == replicas.index((url, _)):
                    continue
                # a record the OTHER replica wrote, with its bodies
                (rid,) = [r["id"] for r in chats if r["session"] == session]
                one = client.get(f"{url}/_kvlens/api/requests/{rid}").json()
                assert one["session"] == session and f"question {int(session.rsplit('_', 1)[1])}" in json.dumps(one)
            stats = client.get(f"{url}/_kvlens/api/stats").json()
            assert stats["conversations"] == len(sent)
            sessions = client.get(f"{url}/_kvlens/api/sessions").json()["sessions"]
            assert {s["conversation"] for s in sessions} == set(sent)
            health = client.get(f"{url}/_kvlens/health").json()
            assert health["store"]["write_failures"] == 0 and health["store"]["dropped"] == 0
        assert seen[0] == seen[1]  # the same records in the same newest-first order

    # each record was written by the replica that served it, twice: provisional, then with its analysis
    assert sum(app.store.stats.written for _, app in replicas) == 2 * len(seen[0])
    capsys.readouterr()
    assert main(["requests", "--db", postgres_url, "--limit", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["requests"] if isinstance(out, dict) else out
    assert {r["session"] for r in rows if r["path"] == "/v1/chat/completions"} == set(sent)


def test_session_affinity_keeps_each_conversations_analysis(replicas: list[tuple[str, KvlensApp]]) -> None:
    sessions = ["ses_affinity_a", "ses_affinity_b", "ses_affinity_c", "ses_affinity_d"]
    used = {affinity({"X-Session-Id": s}, 2) for s in sessions}
    assert used == {0, 1}, "the sessions should spread over both replicas"
    with httpx.Client(timeout=60) as client:
        for session in sessions:
            url = replicas[affinity({"X-Session-Id": session}, 2)][0]
            two_turns(client, (url, url), session)
    flush(replicas)
    store = replicas[0][1].store
    for session in sessions:
        second, first = store.list_exchanges(10, session=session)
        assert first.analysis["causes"][0]["code"] == "first_request"
        assert second.analysis["predecessor_id"] == first.id
        assert second.analysis["causes"][0]["code"] == "append_only"


def test_a_conversation_split_across_replicas_starts_over_on_the_other(replicas: list[tuple[str, KvlensApp]]) -> None:
    """The documented limit (README, "Run for a team"): without affinity the second replica has no
    predecessor in memory for the conversation. Both records are stored and explained; the second
    one is compared with nothing."""
    with httpx.Client(timeout=60) as client:
        two_turns(client, (replicas[0][0], replicas[1][0]), "ses_split")
    flush(replicas)
    second, first = replicas[1][1].store.list_exchanges(10, session="ses_split")
    assert first.analysis["causes"][0]["code"] == "first_request"
    assert second.analysis.get("predecessor_id") is None
    assert second.analysis["causes"][0]["code"] == "first_request"
