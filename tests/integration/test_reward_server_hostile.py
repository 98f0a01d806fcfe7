"""Issue 8: no input can hang, stall or exhaust the reward server, and no outage becomes a wrong reward.

One test (or a few) per numbered item of the issue, each on the real server process over HTTP (uvicorn started as
users start it), answering and judging through the scripted OpenAI-compatible server.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from llm_client import LLMClient
from memory_system import AGENTS, MemoryEntry, MemoryState, MemorySystem
from scripts.bench.hostile_reward_server import poll_health
from scripts.bench.reward_harness import (REPO, free_port, kill, policy_outputs, qa_pairs,
                                          reward_server_process, scripted_server_process, session_actions, wait_for)
from scripts.scripted_server import ScriptedServer
from tests.integration.test_reward_server import _build, memory_responder, request_body
from training.reward_server import reward_function as rf

pytestmark = pytest.mark.integration
TOKEN = "hostile-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NESTED = '{"a":' * 1500 + "1" + "}" * 1500


@pytest.fixture(scope="module")
def llm():
    with ScriptedServer(memory_responder) as srv:
        yield srv


@pytest.fixture(scope="module")
def state_root(tmp_path_factory, llm) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "root"
    root.mkdir()
    asyncio.run(_build(root, llm.base_url))
    good = root / "expert" / "state_8"
    bad = root / "bad"
    # Unreadable states, each a user error (422), never a retryable 503 or a reward.
    for name, files in {
        "truncated_index": {"memory.json": (good / "memory.json").read_bytes(),
                            "index.faiss": (good / "index.faiss").read_bytes()[:100]},
        "list_memory": {"memory.json": b"[1, 2, 3]"},
        "latin1_memory": {"memory.json": '{"core": "caf\u00e9"}'.encode("latin-1")},
        "not_json": {"memory.json": b"{\"core\": "},
        "entries_wrong": {"memory.json": b'{"core": "", "entries": [{"id": 1}]}'},
    }.items():
        (bad / name).mkdir(parents=True)
        for fname, data in files.items():
            (bad / name / fname).write_bytes(data)
    (bad / "loop_a").symlink_to(bad / "loop_b")
    (bad / "loop_b").symlink_to(bad / "loop_a")
    # A state folder inside the root whose index file links to a file outside it.
    leak = root / "leaky"
    leak.mkdir()
    (leak / "memory.json").write_bytes((good / "memory.json").read_bytes())
    (leak / "index.faiss").symlink_to(root.parent / "outside" / "state_8" / "index.faiss")
    return root


@pytest.fixture(scope="module")
def server(state_root, llm):
    with reward_server_process(state_root, llm.base_url, token=TOKEN,
                               extra=["--rendezvous-timeout", "30", "--max-body-bytes", str(2 ** 20),
                                      "--max-qa-pairs", "20"]) as srv:
        yield srv


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", headers=AUTH, timeout=30).json()


def joint_body(state_root: Path, group: str, agent: str, output, **over) -> dict:
    return {"session_group_id": group, "agent": agent, "output": output,
            "state_path": str(state_root / "expert" / "state_8"), "qa_pairs": qa_pairs(3),
            "expert_outputs": session_actions(8), **over}


async def joint_wave(server, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, headers=AUTH) as h:
        return await asyncio.gather(*(h.post(server.url + "/joint_rollout", json=b) for b in bodies))


def raw_exchange(url: str, requests: list[tuple[str, str, dict, bytes]]) -> list[tuple[int, dict, bytes]]:
    """Requests one after another on ONE keep-alive connection; each answer read by its Content-Length."""
    u = urlparse(url)
    out = []
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        f = sock.makefile("rb")
        for method, path, headers, body in requests:
            head = f"{method} {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            sock.sendall(head.encode("latin-1") + body)
            status_line = f.readline()
            assert status_line, f"connection closed before answering {method} {path}"
            status = int(status_line.split()[1])
            hdrs = {}
            while True:
                line = f.readline().decode("latin-1").strip()
                if not line:
                    break
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            out.append((status, hdrs, f.read(int(hdrs.get("content-length", "0")))))
    return out


# --------------------------------------------------------------------------- 1. deep nesting never hangs a group

def test_1_deeply_nested_output_is_a_validity_failure_and_every_member_is_answered(server, state_root):
    bodies = [joint_body(state_root, "nest/1", a, NESTED if a == "semantic" else policy_outputs("n")[a],
                         sample_key=f"nest-{a}", timeout_s=5) for a in AGENTS]
    t0 = time.perf_counter()
    responses = asyncio.run(joint_wave(server, bodies, timeout=30))
    assert time.perf_counter() - t0 < 10
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
    docs = {a: r.json() for a, r in zip(AGENTS, responses)}
    assert len({d["joint_id"] for d in docs.values()}) == 1 and not docs["core"]["timed_out"]
    assert docs["semantic"]["own_status"] == "invalid" and "nested" in docs["semantic"]["own_reason"]
    assert docs["core"]["task"]["agents"]["semantic"]["status"] == "invalid"
    # A retry with the same key re-attaches at once.
    again = post(server, "/joint_rollout", bodies[2])
    assert again.status_code == 200 and again.json()["joint_id"] == docs["semantic"]["joint_id"]
    # /build_and_qa: the same output is a no-op agent, not a 503.
    r = post(server, "/build_and_qa", request_body(state_root, actions={**policy_outputs("n"), "core": NESTED},
                                                   qa_pairs=qa_pairs(2)))
    assert r.status_code == 200 and r.json()["agents"]["core"]["status"] == "invalid"
    # The veRL-side scoring of that sample: valid 0, no exception.
    res = rf.score_sample(rf.RewardConfig(), "semantic", NESTED, None, docs["semantic"])
    assert res["valid"] == 0.0 and res["score"] == 0.0 and "nested" in res["invalid_reason"]
    assert stats(server)["rendezvous"]["open_slots"] == 0


# --------------------------------------------------------------------------- 2. nothing CPU-heavy on the event loop

@pytest.fixture(scope="module")
def large_state(state_root, llm) -> str:
    """A state of 12,000 entries (memory.json of 1.8 MB, a 3 MB index) to load and search off the event loop.

    (Decoding memory.json holds the GIL, about 25 ms a MB here: a state of 30,000 entries stalls the loop ~100 ms
    once, when it is first loaded.)"""
    client = LLMClient(provider="openai", base_url=llm.base_url, api_key="x", embedding_base_url=llm.base_url,
                       embedding_api_key="x")
    ms = MemorySystem(None, embedder=client)
    n = 12_000
    ms.state = MemoryState(core="Name: Dana.", entries=[
        MemoryEntry(f"m{i:06d}", ("episodic", "semantic", "procedural")[i % 3], f"fact number {i} about Dana "
                    f"and topic {i % 97}", f"s{i // 100}") for i in range(n)])
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 64)).astype(np.float32)
    ms.index.add(vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    ms.save(state_root / "large")
    return str(state_root / "large")


def _probe(url: str, work=None, settle_s: float = 1.0, idle_s: float = 2.0) -> list[float]:
    """/health latencies from another process (this one also runs the scripted LLM and the client, whose GIL a
    probe thread here would wait for), while `work()` runs, or for `idle_s`."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    parent, child = ctx.Pipe()
    poller = ctx.Process(target=poll_health, args=(url, stop, child), daemon=True)
    poller.start()
    time.sleep(settle_s)  # the spawned interpreter imports httpx before it probes
    try:
        result = work() if work is not None else time.sleep(idle_s)
    finally:
        stop.set()
        lat = parent.recv()
        poller.join(timeout=10)
    return sorted(lat), result


def _p99(lat: list[float]) -> float:
    return lat[int(0.99 * (len(lat) - 1))]


def test_2_health_answers_within_100ms_while_the_worst_inputs_are_processed(server, state_root, large_state):
    """The bound is the issue's 100 ms p99, plus whatever p99 an idle server shows on this shared machine just before
    (other developers' processes take the CPUs too; a probe waits for CPU time, not for the event loop)."""
    worst = {
        "core": "{" * 48000,
        "episodic": json.dumps({"operations": [{"action": "ADD", "memory": "x"}] * 10_000})[:60000],
        "semantic": "{" + "a," * 30000 + "}",
        "procedural": json.dumps({"operations": [{"action": "ADD", "memory": "y"}] * 10_000}),
    }
    bodies = [request_body(state_root, session_group_id=f"worst{i}", actions=worst, qa_pairs=qa_pairs(2))
              for i in range(6)]
    bodies += [request_body(state_root, session_group_id=f"large{i}", state_path=large_state, qa_pairs=qa_pairs(5))
               for i in range(4)]
    idle, _ = _probe(server.url)

    def work():
        async def go():
            async with httpx.AsyncClient(timeout=120, headers=AUTH) as h:
                return await asyncio.gather(*(h.post(server.url + "/build_and_qa", json=b) for b in bodies))

        t0 = time.perf_counter()
        return asyncio.run(go()), time.perf_counter() - t0

    lat, (responses, busy) = _probe(server.url, work)
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
    assert all(r.json()["invalid_agents"] == sorted(AGENTS) for r in responses[:6])
    assert all(sum(r.json()["retrieval_counts"].values()) == 50 for r in responses[6:])
    print(f"\n/health idle: p99 {_p99(idle) * 1000:.1f} ms; while busy {busy:.2f} s: {len(lat)} probes, p50 "
          f"{lat[len(lat) // 2] * 1000:.1f} ms, p99 {_p99(lat) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
          f"load average {os.getloadavg()[0]:.1f}")
    assert len(lat) >= 10 and float("inf") not in lat
    assert _p99(lat) < 0.1 + _p99(idle)  # before: 24,000 braces stalled it 24 s


# --------------------------------------------------------------------------- 3. auth before the body, body limit

def test_3_auth_is_checked_before_the_body_and_the_body_limit_while_reading(server):
    rss0 = stats(server)["memory"]["rss_mb"]
    big = b"[" + b"1," * (10 * 2 ** 20) + b"1]"  # 20 MB, the limit is 1 MiB
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/build_and_qa", content=big, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 401 and time.perf_counter() - t0 < 5
    r = httpx.post(server.url + "/build_and_qa", content=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["reason"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 2 ** 20

    for path in ("/build_and_qa", "/joint_rollout"):
        try:
            r = httpx.post(server.url + path, content=chunks(), headers=AUTH, timeout=60)
            assert r.status_code == 413 and r.json()["reason"]
        except (httpx.RemoteProtocolError, httpx.WriteError):
            pass  # the server answered 413 and closed while the client was still sending
    s = stats(server)
    assert s["memory"]["rss_mb"] - rss0 < 40, (rss0, s["memory"])
    assert s["http"]["errors"].get("413", 0) >= 2


# --------------------------------------------------------------------------- 4. connections stay usable

def test_4_one_keep_alive_connection_survives_every_error(server, state_root, tmp_path):
    good = json.dumps(request_body(state_root, qa_pairs=qa_pairs(1))).encode()
    js = {"Content-Type": "application/json", **AUTH}
    seq = [
        ("POST", "/build_and_qa", {"Content-Type": "application/json"}, good),  # 401
        ("POST", "/build_and_qa", {**js, "Authorization": "Bearer nope"}, good),  # 403
        ("POST", "/build_and_qa", js, b"\xff\xfe not utf-8"),  # 422
        ("POST", "/build_and_qa", js, b"[" * 10_000 + b"]" * 10_000),  # 422
        ("POST", "/build_and_qa", js, json.dumps(request_body(state_root, state_path="expert/none")).encode()),
        ("POST", "/joint_rollout", js, json.dumps({"agent": "core"}).encode()),  # 422
        ("POST", "/build_and_qa", js, json.dumps(request_body(state_root, state_path="bad/list_memory")).encode()),
        ("GET", "/stats", AUTH, b""),
        ("POST", "/build_and_qa", js, good),  # 200 on the same connection
    ]
    answers = raw_exchange(server.url, seq)
    assert [a[0] for a in answers] == [401, 403, 422, 422, 404, 422, 422, 200, 200]
    for status, headers, body in answers:
        assert headers.get("connection", "").lower() != "close"
        if status != 200:
            assert json.loads(body)["reason"]
    assert "Exception in ASGI application" not in server.output()


def test_4_a_retryable_503_keeps_the_connection(state_root):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with reward_server_process(state_root, dead, extra=["--max-retries", "0"]) as rs:
        good = json.dumps(request_body(state_root, qa_pairs=qa_pairs(1))).encode()
        js = {"Content-Type": "application/json"}
        answers = raw_exchange(rs.url, [("POST", "/build_and_qa", js, good)] * 3 + [("GET", "/health", {}, b"")])
        out = rs.output()
    assert [a[0] for a in answers] == [503, 503, 503, 200]
    assert all(json.loads(a[2])["retryable"] is True for a in answers[:3])
    assert "Exception in ASGI application" not in out


# --------------------------------------------------------------------------- 5. user errors are 422, not 503

@pytest.mark.parametrize("path,status", [
    ("bad/loop_a", 422), ("expert/state_8\x00x", 422), ("expert/" + "x" * 5000, 422),
    ("bad/truncated_index", 422), ("bad/list_memory", 422), ("bad/latin1_memory", 422), ("bad/not_json", 422),
    ("bad/entries_wrong", 422), ("leaky", 403), ("~nobody_here/x", 422),
])
def test_5_unreadable_states_are_user_errors_on_both_endpoints(server, state_root, path, status):
    r = post(server, "/build_and_qa", request_body(state_root, state_path=path, qa_pairs=qa_pairs(1)))
    assert r.status_code == status, r.text
    assert r.json()["reason"] and "retryable" not in r.json()
    r = post(server, "/joint_rollout", joint_body(state_root, f"bad/{path[:20]}", "core", "{}", state_path=path,
                                                  timeout_s=0.2))
    assert r.status_code == status, r.text  # never 200 with a reward of 0


@pytest.mark.parametrize("body", [b"\xff\xfe\x00garbage", b"[" * 10_000 + b"]" * 10_000,
                                  b'{"a":' * 10_000 + b"1" + b"}" * 10_000, b"{not json", b"[]", b"null"])
@pytest.mark.parametrize("endpoint", ["/build_and_qa", "/joint_rollout"])
def test_5_non_utf8_and_deeply_nested_bodies_are_422_with_reason(server, endpoint, body):
    r = httpx.post(server.url + endpoint, content=body, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 422 and r.json()["reason"], r.text


def test_5_wrong_types_inside_outputs_are_validity_failures(server, state_root):
    actions = {"core": {"operation": ["APPEND"]}, "episodic": {"operations": [{"action": "ADD", "memory": 12}]},
               "semantic": [1, 2], "procedural": 3.5}
    r = post(server, "/build_and_qa", request_body(state_root, actions=actions, qa_pairs=qa_pairs(1)))
    assert r.status_code == 200 and r.json()["invalid_agents"] == sorted(AGENTS)
    experts = {"core": 5, "episodic": {"operations": "x"}, "semantic": None, "procedural": ["a"]}
    r = post(server, "/joint_rollout", joint_body(state_root, "types/1", "core", {"operation": {"x": 1}},
                                                  expert_outputs=experts, timeout_s=0.2))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["own_status"] == "invalid" and d["timed_out"]
    assert {a: s["status"] for a, s in d["task"]["agents"].items()} == \
        {"core": "invalid", "episodic": "invalid", "semantic": "absent", "procedural": "invalid"}


# --------------------------------------------------------------------------- 6. an outage is never a wrong reward

def test_6_an_llm_outage_fails_requests_retryably_and_counts_every_failed_call(state_root):
    port = free_port()
    llm = scripted_server_process(port=port).start()
    try:
        with reward_server_process(state_root, llm.url, max_in_flight=16, extra=["--max-retries", "1"],
                                   env={"MEMBUILDER_BACKOFF_BASE": "0.05"}) as rs:
            body = request_body(state_root, qa_pairs=qa_pairs(4))
            clean = httpx.post(rs.url + "/build_and_qa", json=body, timeout=60).json()

            async def wave():
                async with httpx.AsyncClient(timeout=120) as h:
                    async def one(i):
                        await asyncio.sleep(i * 0.05)
                        return await h.post(rs.url + "/build_and_qa", json={**body, "session_group_id": f"o{i}"})
                    return await asyncio.gather(*(one(i) for i in range(140)))  # 7 s of arrivals

            def outage():
                time.sleep(1.0)
                kill(llm)
                time.sleep(3.0)
                llm.start()

            t = threading.Thread(target=outage)
            t.start()
            responses = asyncio.run(wave())
            t.join()
            s = httpx.get(rs.url + "/stats", timeout=30).json()
    finally:
        llm.stop()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 0 < codes.count(503) < len(codes), codes
    for r in responses:
        d = r.json()
        if r.status_code == 200:
            assert d["task_reward"] == clean["task_reward"] and d["correct"] == clean["correct"]
            assert not any(q["failed"] for q in d["qa_results"])
        else:
            assert d["retryable"] is True and "failed" in d["reason"]
    failures = s["engine"]["llm_failures"]
    assert failures["total"] >= codes.count(503) == s["engine"]["upstream_failures"]
    print(f"\noutage: {codes.count(503)} of {len(codes)} requests 503 retryable, failed LLM calls {failures}")


# --------------------------------------------------------------------------- 7. caps and disconnects

def test_7_caps_on_qa_pairs_strings_and_sparse_reward(server, state_root, llm):
    n0 = len(llm.requests())
    many = [{"question": f"q{i}?", "answer": "a"} for i in range(10_000)]
    t0 = time.perf_counter()
    r = post(server, "/build_and_qa", request_body(state_root, qa_pairs=many))
    assert r.status_code == 422 and "cap" in r.json()["reason"] and time.perf_counter() - t0 < 5
    r = post(server, "/joint_rollout", joint_body(state_root, "cap/1", "core", "{}", qa_pairs=many[:21]))
    assert r.status_code == 422 and "cap" in r.json()["reason"]
    r = post(server, "/build_and_qa", request_body(state_root, qa_pairs=[{"question": "q" * 20_000, "answer": "a"}]))
    assert r.status_code == 422 and "question" in r.json()["reason"]
    r = post(server, "/build_and_qa", request_body(state_root, session_group_id="g" * 1000))
    assert r.status_code == 422 and "session_group_id" in r.json()["reason"]
    for sparse in ({"drop_rate": 0.5, "default_reward": 1e308}, {"drop_rate": 0.5, "default_reward": -1},
                   {"drop_rate": 7}):
        r = post(server, "/joint_rollout", joint_body(state_root, "cap/2", "core", "{}", sparse=sparse))
        assert r.status_code == 422 and "sparse" in r.json()["reason"], r.text
    r = httpx.post(server.url + "/joint_rollout", headers={**AUTH, "Content-Type": "application/json"},
                   content=json.dumps(joint_body(state_root, "cap/3", "core", "{}")).replace(
                       '"expert_outputs"', '"timeout_s": NaN, "expert_outputs"'))
    assert r.status_code == 422 and "timeout_s" in r.json()["reason"]
    assert len(llm.requests()) == n0  # none of these cost an LLM call
    with pytest.raises(ValueError, match="sparse_default_reward"):
        rf.RewardConfig(sparse_default_reward=1e308)


def test_7_client_disconnect_cancels_the_llm_work(state_root):
    with ScriptedServer(memory_responder, latency_s=0.4) as slow:
        with reward_server_process(state_root, slow.base_url, max_in_flight=2,
                                   extra=["--max-qa-pairs", "64"]) as rs:
            body = request_body(state_root, qa_pairs=[{"question": f"What happened on day {i}?", "answer": "x"}
                                                      for i in range(40)])
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(rs.url + "/build_and_qa", json=body, timeout=1.0)
            time.sleep(1.0)
            n_after = len(slow.requests())
            time.sleep(2.0)
            n_later = len(slow.requests())
            s = httpx.get(rs.url + "/stats").json()
    # 1 embedding + 80 answer/judge calls at 2 in flight would take 16 s; the work stopped within a round trip.
    assert n_later - n_after <= 2 and n_later < 12, (n_after, n_later)
    assert s["engine"]["cancelled"] == 1 and s["engine"]["llm_slots"]["in_flight"] == 0


# --------------------------------------------------------------------------- 8. SIGTERM resolves and exits

def _sigterm_with(state_root: Path, latency_s: float, calls: dict[str, tuple[str, dict]], *,
                  ready=lambda rs: True) -> tuple[float, dict]:
    """Start a reward server, make `calls` (name -> (path, body)) in threads, SIGTERM it once `ready(rs)`; returns
    (seconds from SIGTERM to exit, name -> response or exception)."""
    with ScriptedServer(memory_responder, latency_s=latency_s) as llm_:
        rs = reward_server_process(state_root, llm_.base_url, max_in_flight=1,
                                   extra=["--rendezvous-timeout", "3600"]).start()
        results: dict[str, httpx.Response | Exception] = {}
        try:
            def call(name: str, path: str, body: dict) -> None:
                try:
                    results[name] = httpx.post(rs.url + path, json=body, timeout=60)
                except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                    results[name] = exc

            threads = [threading.Thread(target=call, args=(n, p, b)) for n, (p, b) in calls.items()]
            for t in threads:
                t.start()
            assert wait_for(lambda: ready(rs), 20)
            time.sleep(0.5)
            t0 = time.perf_counter()
            rs.proc.send_signal(signal.SIGTERM)
            rs.proc.wait(timeout=30)
            exit_s = time.perf_counter() - t0
            for t in threads:
                t.join(timeout=30)
        finally:
            rs.stop()
    return exit_s, results


def test_8_sigterm_scores_an_open_slot_with_the_expert_and_exits_within_10s(state_root):
    """A sample whose partners never come (its slot would wait an hour) is scored at SIGTERM with the expert's
    outputs in the three missing places, answered, and the server exits."""
    waiting = joint_body(state_root, "term/1", "core", policy_outputs("t")["core"], qa_pairs=qa_pairs(2),
                         timeout_s=3600)
    exit_s, results = _sigterm_with(state_root, 0.05, {"slot": ("/joint_rollout", waiting)},
                                    ready=lambda rs: httpx.get(rs.url + "/stats").json()["rendezvous"]
                                    ["open_slots"] == 1)
    print(f"\nSIGTERM to exit with an open slot: {exit_s:.2f} s")
    assert exit_s < 10
    r = results["slot"]
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    d = r.json()
    assert d["timed_out"] and [d["members"][a] for a in AGENTS] == ["policy", "expert", "expert", "expert"]
    assert d["task"]["total"] == 2


def test_8_sigterm_answers_long_work_retryably_and_exits_within_10s(state_root):
    """A request whose LLM work outlives the grace (40 calls at 1 s, one at a time) is answered 503 retryable."""
    long = request_body(state_root, qa_pairs=[{"question": f"q {i}?", "answer": "x"} for i in range(20)])
    exit_s, results = _sigterm_with(state_root, 1.0, {"long": ("/build_and_qa", long)},
                                    ready=lambda rs: httpx.get(rs.url + "/stats").json()["engine"]["llm_slots"]
                                    ["in_flight"] == 1)
    print(f"\nSIGTERM to exit with long work: {exit_s:.2f} s")
    assert exit_s < 10
    r = results["long"]
    assert isinstance(r, httpx.Response) and r.status_code == 503 and r.json()["retryable"] is True
    assert "shutting down" in r.json()["reason"]


# --------------------------------------------------------------------------- 9. keys, confinement, exposure, workers

def test_9_a_sample_key_is_bound_to_its_group(server, state_root):
    bodies = [joint_body(state_root, "key/1", a, policy_outputs("k")[a], sample_key=f"key1-{a}") for a in AGENTS]
    first = asyncio.run(joint_wave(server, bodies))
    assert [r.status_code for r in first] == [200] * 4
    r = post(server, "/joint_rollout", joint_body(state_root, "key/2", "core", "{}", sample_key="key1-core"))
    assert r.status_code == 422 and "another session group" in r.json()["reason"]


def test_9_a_symlinked_file_in_a_state_folder_is_refused(server, state_root):
    r = post(server, "/build_and_qa", request_body(state_root, state_path="leaky"))
    assert r.status_code == 403 and "links outside" in r.json()["reason"]


def _server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.reward_server.server", *args], cwd=REPO, timeout=60,
                          capture_output=True, text=True, env={**os.environ, "REWARD_SERVER_TOKEN": "", **(env or {})})


def test_9_non_loopback_host_without_a_token_refuses_to_start(state_root):
    p = _server_cli("--host", "0.0.0.0", "--port", "0", "--state-root", str(state_root), "--provider", "offline")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--insecure-no-token" in p.stderr
    assert "READY" not in p.stdout
    # With the override the host check passes (the next check, a bad body limit, stops it before it binds).
    p = _server_cli("--host", "0.0.0.0", "--insecure-no-token", "--max-body-bytes", "1", "--state-root",
                    str(state_root), "--provider", "offline")
    assert p.returncode == 2 and "--max-body-bytes" in p.stderr


def test_9_health_reveals_nothing_without_the_token(server):
    r = httpx.get(server.url + "/health")
    assert r.json() == {"status": "ok"}
    assert "state_root" in httpx.get(server.url + "/health", headers=AUTH).json()


def test_9_local_mode_with_several_reward_workers_fails_at_once(state_root, llm, monkeypatch):
    info = {"session_group_id": "g", "agent": "core", "state_path": None, "qa_pairs": qa_pairs(1)}
    local = {"state_root": str(state_root), "base_url": llm.base_url, "api_key": "x"}
    with pytest.raises(ValueError, match="num_workers=1"):
        asyncio.run(rf.compute_score("m", "{}", None, info, task_reward_mode="local", local=local,
                                     reward_num_workers=2))

    class FakeRay:
        @staticmethod
        def get_runtime_context():
            class Ctx:
                @staticmethod
                def get_actor_name():
                    return "reward_loop_worker_1"
            return Ctx()

    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    with pytest.raises(ValueError, match="num_workers=1"):
        asyncio.run(rf.compute_score("m", "{}", None, info, task_reward_mode="local", local=local))


def test_1_a_deep_but_decodable_output_object_is_a_validity_failure(server, state_root):
    deep: dict = {"x": 1}
    for _ in range(900):  # under Python's JSON recursion limit, so it reaches the model as an object
        deep = {"a": deep}
    bodies = [joint_body(state_root, "deepobj/1", a, deep if a == "episodic" else policy_outputs("d")[a])
              for a in AGENTS]
    responses = asyncio.run(joint_wave(server, bodies))
    assert [r.status_code for r in responses] == [200] * 4
    assert responses[1].json()["own_status"] == "invalid"
    r = post(server, "/build_and_qa", request_body(state_root, actions={"semantic": {"operations": [deep]}},
                                                   qa_pairs=qa_pairs(1)))
    assert r.status_code == 200 and r.json()["agents"]["semantic"]["status"] == "invalid"


def test_4_routing_errors_have_a_reason_too(server):
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and r.json()["reason"]
    r = httpx.get(server.url + "/build_and_qa", headers=AUTH)
    assert r.status_code == 405 and r.json()["reason"]


def test_7_joint_rollout_clients_going_away_cancel_its_scoring(state_root):
    with ScriptedServer(memory_responder, latency_s=0.4) as slow:
        with reward_server_process(state_root, slow.base_url, max_in_flight=2, token=TOKEN) as rs:
            many = [{"question": f"What happened on day {i}?", "answer": "x"} for i in range(40)]
            bodies = [joint_body(state_root, "gone/1", a, policy_outputs("g")[a], qa_pairs=many,
                                 sample_key=f"gone-{a}") for a in AGENTS]

            async def leave():
                async with httpx.AsyncClient(timeout=1.0, headers=AUTH) as h:
                    return await asyncio.gather(*(h.post(rs.url + "/joint_rollout", json=b) for b in bodies),
                                                return_exceptions=True)

            out = asyncio.run(leave())
            assert all(isinstance(o, httpx.ReadTimeout) for o in out)
            time.sleep(1.0)
            n_after = len(slow.requests())
            time.sleep(2.0)
            n_later = len(slow.requests())
            s = httpx.get(rs.url + "/stats", headers=AUTH).json()
    assert n_later - n_after <= 2 and n_later < 12, (n_after, n_later)
    assert s["rendezvous"]["cancelled"] == 1 and s["rendezvous"]["running"] == 0
    assert s["engine"]["llm_slots"]["in_flight"] == 0


def test_zz_after_all_of_the_above_the_server_still_exits_on_sigterm(server):
    """Last in this file: the server that took every hostile input above (which once made it ignore SIGTERM) has no
    work left and exits promptly."""
    s = stats(server)
    assert s["rendezvous"]["open_slots"] == 0 and s["rendezvous"]["running"] == 0
    assert s["engine"]["llm_slots"]["in_flight"] == 0
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    assert time.perf_counter() - t0 < 10
    assert "Exception in ASGI application" not in server.output()
