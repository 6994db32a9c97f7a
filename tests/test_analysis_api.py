"""The analysis as users see it: in the API, in `kvlens explain / diff / sessions`, in stats and metrics."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import KvlensApp
from proxy.cli import main
from proxy.emulator import EmulatorSettings, create_app as create_emulator
from tests.servers import serve_in_thread
from tests.test_forward import kvlens, records

CAPTURE = Path(__file__).parent / "fixtures" / "clients" / "opencode-1.18.33-two-turns.jsonl"


@pytest.fixture
def emulator() -> Iterator[str]:
    settings = EmulatorSettings(prompt_tps=200_000, gen_tps=2000, ctx=65536)
    with serve_in_thread(create_emulator(settings), server_header=False, date_header=False) as url:
        yield url


def opencode() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CAPTURE.read_text().splitlines()]


def send(client: httpx.Client, url: str, req: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    headers = {k: v for k, v in req["headers"].items() if k.lower() not in ("host", "content-length")}
    r = client.post(url + req["path"], headers=headers, json=dict(body, stream=False, max_tokens=24))
    assert r.status_code == 200, r.text
    return r.json()


def conversation(url: str) -> list[dict[str, Any]]:
    """The real opencode session's title and first turn, then a second turn that appends the
    emulator's own reply (healthy), then a third whose system prompt date changed."""
    title, first, _ = opencode()
    with httpx.Client(timeout=60) as client:
        send(client, url, title, title["body"])
        reply = send(client, url, first, first["body"])["choices"][0]["message"]
        second = copy.deepcopy(first["body"])
        second["messages"] += [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "and now?"}]
        reply2 = send(client, url, first, second)["choices"][0]["message"]
        third = copy.deepcopy(second)
        third["messages"] += [{"role": "assistant", "content": reply2["content"]}, {"role": "user", "content": "more"}]
        system = third["messages"][0]["content"]
        assert "Today's date: " in system
        start = system.index("Today's date: ") + len("Today's date: ")
        third["messages"][0]["content"] = system[:start] + "Sun Jan 01 2034" + system[start + 15 :]
        send(client, url, first, third)
    return [title, first]


def test_analysis_of_a_real_opencode_session(emulator: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "k.sqlite3"
    with kvlens(emulator, db) as (url, app):
        conversation(url)
        third, second, first, title = records(app)
        session = first.session
        assert {r.analysis["conversation"] for r in (title, first, second, third)} == {session}

        assert title.analysis["kind"] == "side:title"
        assert title.analysis["causes"][0]["code"] == "side_request"
        assert first.analysis["causes"][0]["code"] == "first_request"

        a2 = second.analysis
        assert a2["tokens_source"] == "upstream" and a2["prompt_tokens"] == second.prompt_tokens
        assert a2["predecessor_id"] == first.id
        assert a2["causes"][0]["code"] == "append_only"
        assert a2["divergence"]["level"] == "none"
        assert a2["cached_expected"] == a2["cached_upstream"] == second.cached_tokens
        assert a2["lost_tokens"] == 0

        a3 = third.analysis
        assert a3["causes"][0]["code"] == "volatile_datetime"
        d = a3["divergence"]
        new = json.loads(app.store.get_exchange(third.id).request_body)["messages"][0]["content"]
        old = json.loads(app.store.get_exchange(second.id).request_body)["messages"][0]["content"]
        assert (d["level"], d["message_index"], d["role"], d["field"]) == ("body", 0, "system", "content")
        assert d["char_offset"] == len(os.path.commonprefix([old, new])) >= new.index("Sun Jan 01 2034")
        assert a3["cached_expected"] == a3["cached_upstream"] == a3["common_prefix"]
        assert a3["lost_tokens"] > 0 and a3["lost_seconds"] > 0
        assert a3["lost_tokens"] == a3["reusable_tokens"] - a3["cached_upstream"]

        with httpx.Client() as client:
            one = client.get(f"{url}/_kvlens/api/requests/{third.id}").json()
            assert one["analysis"]["causes"][0]["code"] == "volatile_datetime"
            by_cause = client.get(f"{url}/_kvlens/api/requests?cause=volatile_datetime").json()["requests"]
            assert [r["id"] for r in by_cause] == [third.id]
            sessions = client.get(f"{url}/_kvlens/api/sessions").json()["sessions"]
            assert sessions[0]["conversation"] == session and sessions[0]["requests"] == 4
            assert sessions[0]["side_requests"] == 1
            assert sessions[0]["lost_seconds_by_cause"]["volatile_datetime"] > 0
            stats = client.get(f"{url}/_kvlens/api/stats").json()
            assert stats["requests"] >= 4 and stats["conversations"] == 1
            assert stats["lost_seconds_by_cause"]["volatile_datetime"] == pytest.approx(a3["lost_seconds"], abs=1e-3)
            metrics = client.get(f"{url}/_kvlens/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        lost = {s.labels.get("cause"): s.value for s in families["kvlens_lost_seconds"].samples if s.name.endswith("_total")}
        assert lost["volatile_datetime"] == pytest.approx(a3["lost_seconds"], rel=1e-3)

    assert main(["explain", third.id[:10], "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "[volatile_datetime]" in out and "fix:" in out and "messages[0] (system)" in out and "⟦" in out
    assert main(["diff", second.id, third.id, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "~ messages[0] system" in out and "+ messages[5] user" in out
    assert main(["sessions", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert session[:20] in out and "volatile_datetime" in out
    assert main(["requests", "--db", str(db), "--cause", "append_only"]) == 0
    assert second.id[:12] in capsys.readouterr().out


def test_analysis_failure_never_loses_the_record(emulator: str, tmp_path: Path) -> None:
    # The analysis runs in this process (isolation=thread) so that the test can break one of its steps.
    with kvlens(emulator, tmp_path / "k.sqlite3", analysis_isolation="thread") as (url, app):
        assert isinstance(app, KvlensApp) and app.analyzer is not None

        def broken(*_: Any) -> Any:
            raise RuntimeError("boom")

        app.analyzer._simulate = broken  # type: ignore[method-assign]
        with httpx.Client(timeout=30) as client:
            r = client.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        [rec] = records(app)
        assert rec.analysis == {"error": "analysis failed: RuntimeError: boom"}
        assert rec.status == 200


def test_analysis_with_upstream_tokenizer_gone_is_approximate(tmp_path: Path) -> None:
    """An OpenAI-compatible upstream without /tokenize: kvlens falls back and says so."""
    from tests.upstreams import ScriptedUpstream

    with serve_in_thread(ScriptedUpstream(), server_header=False, date_header=False) as upstream:
        with kvlens(upstream, tmp_path / "k.sqlite3") as (url, app):
            with httpx.Client(timeout=30) as client:
                client.post(url + "/recorded/chat-nonstream", json={"messages": [{"role": "user", "content": "x"}]})
                client.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            for rec in records(app):
                if rec.path == "/v1/chat/completions":
                    assert rec.analysis["tokens_source"] == "approximate"
                    assert rec.analysis["tokens_error"]
