"""The reward server as a real uvicorn process on 127.0.0.1, called over HTTP, answering and judging through the
scripted OpenAI-compatible server: end-to-end rewards, whole-state retrieval, bad input, the in-flight bound,
faults under load, and joint rollouts scored the way veRL 0.9.1's reward loop scores them (every sample of a batch
in flight at once through `compute_score`)."""
from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from llm_client import LLMClient
from memory_system import AGENTS, dominant_type
from scripts.bench.reward_harness import (EARLY_ANSWER, EARLY_FACT, EARLY_QUESTION, REPO, ProcessServer,
                                          build_expert_state, policy_outputs, qa_pairs, reward_server_process,
                                          session_actions)
from scripts.scripted_server import ScriptedServer, default_responder
from training.reward_server import reward_function as rf

pytestmark = pytest.mark.integration
TOKEN = "test-token-0123"


def _user(body: dict) -> str:
    return "\n".join(m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user")


def memory_responder(task: str, body: dict) -> str:
    """Answers only from what the server put in the answer prompt; the judge checks the gold against the answer."""
    text = _user(body)
    if task == "answer":
        retrieved = text.split("Retrieved memories:", 1)[-1].split("\n\nCurrent date:", 1)[0]
        question = re.search(r"^Question: (.*)$", text, re.MULTILINE).group(1)
        if "cat" in question:
            return EARLY_ANSWER if EARLY_ANSWER in retrieved else "Not answerable"
        return retrieved.strip()
    if task.startswith("judge"):
        gold = re.search(r"^Gold answer: (.*)$", text, re.MULTILINE).group(1).strip()
        answer = text.split("Answer to grade: ", 1)[-1]
        return json.dumps({"label": "CORRECT" if gold.lower() in answer.lower() else "WRONG"})
    return default_responder(task, body)


async def _build(root: Path, base_url: str) -> None:
    client = LLMClient(provider="openai", base_url=base_url, api_key="x", embedding_base_url=base_url,
                       embedding_api_key="x")
    await build_expert_state(root / "expert" / "state_8", client, n_sessions=8)
    await build_expert_state(root.parent / "outside" / "state_8", client, n_sessions=2)
    await client.aclose()


@pytest.fixture(scope="module")
def llm():
    with ScriptedServer(memory_responder) as srv:
        yield srv


@pytest.fixture(scope="module")
def state_root(tmp_path_factory, llm) -> Path:
    root = tmp_path_factory.mktemp("reward") / "root"
    root.mkdir()
    asyncio.run(_build(root, llm.base_url))
    (root / "link_out").symlink_to(root.parent / "outside" / "state_8")
    return root


@pytest.fixture(scope="module")
def server(state_root, llm):
    with reward_server_process(state_root, llm.base_url, token=TOKEN, extra=["--rendezvous-timeout", "30"]) as srv:
        yield srv


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


UNKNOWN_QA = {"question": "Which city did I fly to for the June conference?", "answer": "Kyoto"}


def request_body(state_root: Path, **over) -> dict:
    """Five QAs: four whose answers the expert state holds, one it does not."""
    return {"session_group_id": "lme/s/8", "state_path": str(state_root / "expert" / "state_8"),
            "actions": policy_outputs("e2e"), "qa_pairs": qa_pairs(4) + [UNKNOWN_QA], "current_time": "2023-04-02",
            **over}


# --------------------------------------------------------------------------- end to end

def test_health_needs_no_token_but_everything_else_does(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # nothing about the setup without the token
    d = httpx.get(server.url + "/health", headers=AUTH).json()
    assert d["answer"].endswith("gpt-4.1-mini") and d["judge"].endswith("gpt-4.1")
    assert d["answer_top_k"] == 10 and "state_root" in d
    assert post(server, "/build_and_qa", {}, headers={}).status_code == 401
    assert post(server, "/build_and_qa", {}, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert post(server, "/build_and_qa", {}, headers={"Authorization": TOKEN}).status_code == 403
    assert httpx.get(server.url + "/stats").status_code == 401
    assert post(server, "/joint_rollout", {}, headers={}).status_code == 401


def test_start_script_passes_the_token(state_root):
    """The script runs the interpreter named by PYTHON (here the one running the tests), not whatever `python` is
    first on PATH."""
    script = REPO / "training" / "reward_server" / "start_server.sh"
    with ProcessServer(["bash", str(script), "--port", "0", "--provider", "offline", "--state-root", str(state_root),
                        "--", "--log-level", "warning"],
                       env={"REWARD_SERVER_TOKEN": "from-env", "PYTHON": sys.executable}) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        auth = {"Authorization": "Bearer from-env"}
        assert httpx.get(srv.url + "/health", headers=auth).json()["answer"] == "offline/offline-baseline"
        assert httpx.get(srv.url + "/stats").status_code == 401
        assert httpx.get(srv.url + "/stats", headers=auth).status_code == 200


def test_end_to_end_reward(server, state_root, llm):
    before = {t: len(llm.requests(task_prefix=t)) for t in ("answer", "judge", "embed")}
    r = post(server, "/build_and_qa", request_body(state_root))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["success"] and not d["fallback"] and d["total"] == 5 and len(d["qa_results"]) == 5
    assert d["task_reward"] == pytest.approx(d["correct"] / 5)
    assert d["correct"] == sum(q["verdict"] == "CORRECT" for q in d["qa_results"])
    assert 0 < d["correct"] < 5  # the responder makes the reward depend on what was retrieved
    assert d["new_entries"] == 2  # episodic 1 + semantic 1 + procedural 0 (core is no entry)
    assert all(s["status"] == "valid" for s in d["agents"].values()) and d["invalid_agents"] == []
    counts = d["retrieval_counts"]
    assert counts == {t: sum(q["type_counts"][t] for q in d["qa_results"]) for t in counts}
    assert sum(counts.values()) == 50  # top-10 for each of the 5 questions
    assert d["dominant_type"] == dominant_type(counts) == d["dominant_agent"]
    after = {t: len(llm.requests(task_prefix=t)) for t in ("answer", "judge", "embed")}
    # 5 answers, 5 judgments, and one embedding batch (new entries and questions together).
    assert {t: after[t] - before[t] for t in after} == {"answer": 5, "judge": 5, "embed": 1}


def test_answers_over_the_whole_loaded_state(server, state_root, llm):
    """An expert entry from the first session (eight sessions back) is retrieved for its question."""
    body = request_body(state_root, qa_pairs=[{"question": EARLY_QUESTION, "answer": EARLY_ANSWER}])
    n0 = len(llm.requests(task_prefix="answer"))
    d = post(server, "/build_and_qa", body).json()
    q = d["qa_results"][0]
    assert q["verdict"] == "CORRECT" and q["answer"] == EARLY_ANSWER
    assert sum(q["type_counts"].values()) == 10
    prompt = _user(llm.requests(task_prefix="answer")[n0].body)
    assert EARLY_FACT in prompt  # the session-0 entry reached the answer model
    assert "Name: Dana" in prompt  # and the whole core block


def test_release_compatible_request(server, state_root):
    body = {"session_group_id": "conv/3", "state_before_path": str(state_root / "expert" / "state_8"),
            "memory_actions": [{"agent_type": a, "action": json.loads(o)} for a, o in policy_outputs("rel").items()],
            "qa_questions": [{"question": EARLY_QUESTION, "answer": EARLY_ANSWER}]}
    d = post(server, "/build_and_qa", body).json()
    assert d["success"] and d["total"] == 1 and d["correct"] == 1 and d["task_reward"] == 1.0
    assert d["dominant_agent"] in ("episodic", "semantic", "procedural")


def test_empty_state_path_means_empty_memory(server):
    body = {"session_group_id": "first", "state_path": None, "actions": policy_outputs("first"),
            "qa_pairs": [{"question": "Which race is Dana training for?", "answer": "half marathon"}]}
    d = post(server, "/build_and_qa", body).json()
    assert d["new_entries"] == 2 and d["correct"] == 1 and sum(d["retrieval_counts"].values()) == 2


# --------------------------------------------------------------------------- bad input

def test_state_paths_confined_to_the_root(server, state_root):
    outside = state_root.parent / "outside" / "state_8"
    assert (outside / "memory.json").is_file()
    cases = {"expert/state_99": 404, str(state_root / "nowhere"): 404, "../outside/state_8": 403,
             str(outside): 403, "link_out": 403, "/etc": 403}
    for path, status in cases.items():
        r = post(server, "/build_and_qa", request_body(state_root, state_path=path))
        assert r.status_code == status, (path, r.text)
        assert r.json()["reason"]
    r = post(server, "/joint_rollout", {"session_group_id": "g", "agent": "core", "output": "{}",
                                        "state_path": "../outside/state_8", "qa_pairs": []})
    assert r.status_code == 403
    # Relative paths resolve against the root.
    assert post(server, "/build_and_qa", request_body(state_root, state_path="expert/state_8")).status_code == 200


def test_malformed_actions_are_validity_failures_not_errors(server, state_root):
    actions = {"core": '{"operation": "SKIP"}', "episodic": "<think>hmm</think> not json",
               "semantic": {"operations": [{"action": "DELETE", "memory": "x"}]},
               "procedural": json.dumps({"operations": [{"action": "ADD", "memory": "Stretch routine | Steps: 1. a"}]})}
    r = post(server, "/build_and_qa", request_body(state_root, actions=actions))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["invalid_agents"] == ["core", "episodic", "semantic"]
    assert "SKIP" in d["agents"]["core"]["reason"] and "DELETE" in d["agents"]["semantic"]["reason"]
    assert d["agents"]["procedural"] == {"status": "valid", "n_actions": 1, "reason": None}
    assert d["new_entries"] == 1  # only the valid agent's entry was applied
    # A missing agent is absent (a no-op), not an error.
    d = post(server, "/build_and_qa", request_body(state_root, actions={"episodic": actions["procedural"]})).json()
    assert [d["agents"][a]["status"] for a in AGENTS] == ["absent", "valid", "absent", "absent"]
    assert d["new_entries"] == 1


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b.pop("qa_pairs"), "qa_pairs"),
    (lambda b: b.update(qa_pairs="five questions"), "qa_pairs"),
    (lambda b: b.update(qa_pairs=[{"question": "", "answer": "x"}]), "question"),
    (lambda b: b.update(qa_pairs=[{"question": "q?"}]), "answer"),
    (lambda b: b.update(actions={"memory": "{}"}), "unknown agent"),
    (lambda b: b.update(actions="APPEND"), "actions"),
    (lambda b: b.update(actions=[{"agent_type": "core", "action": {}}, {"agent_type": "core", "action": {}}]),
     "more than once"),
    (lambda b: b.pop("actions"), "actions"),
])
def test_malformed_request_is_422_with_reason(server, state_root, mutate, needle):
    body = request_body(state_root)
    mutate(body)
    r = post(server, "/build_and_qa", body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["reason"]


def test_non_json_body_is_422(server):
    r = httpx.post(server.url + "/build_and_qa", content=b"{not json", headers={**AUTH, "Content-Type":
                                                                                "application/json"})
    assert r.status_code == 422 and r.json()["reason"]
    r = post(server, "/joint_rollout", {"session_group_id": "g", "agent": "archivist", "output": "{}",
                                        "qa_pairs": []})
    assert r.status_code == 422 and "agent" in r.json()["reason"]


# --------------------------------------------------------------------------- joint rollouts via compute_score

def extra_info(state_root: Path, session: int, agent: str, *, parquet_like: bool = False) -> dict:
    qa = qa_pairs(5)
    info = {"session_group_id": f"longmemeval/sample{session}/8", "agent": agent, "sample_id": f"sample{session}",
            "session_index": 8, "session_time": "2023-04-02", "state_path": str(state_root / "expert" / "state_8"),
            "qa_pairs": qa, "expert_outputs": session_actions(8)}
    if parquet_like:  # what a parquet row becomes: numpy arrays of dicts
        info["qa_pairs"] = np.array(qa, dtype=object)
    return info


def api_kwargs(server, **over) -> dict:
    return {"task_reward_mode": "api", "memory_api_url": server.url, "rendezvous_timeout_s": 30, **over}


async def score_batch(calls: list[tuple[str, dict]], kwargs: dict) -> list[dict]:
    """What veRL 0.9.1's reward loop does with an async reward function: every sample awaited together."""
    try:
        return await asyncio.gather(*(rf.compute_score("membuilder", out, None, info, **kwargs)
                                      for out, info in calls))
    finally:
        await rf._close_http_client()


def check_joints(results: list[dict], calls: list[tuple[str, dict]], *, expect_joints: int) -> dict:
    joints = defaultdict(list)
    for res, (_, info) in zip(results, calls):
        joints[res["joint_id"]].append((info["agent"], info["session_group_id"], res))
    assert len(joints) == expect_joints
    for jid, members in joints.items():
        assert sorted(a for a, _, _ in members) == sorted(AGENTS), jid  # one sample of each agent: one to one
        assert {g for _, g, _ in members} == {jid.split("#")[0]}
        rs = [r for _, _, r in members]
        assert len({r["task_reward"] for r in rs}) == 1 and len({r["dominant_type"] for r in rs}) == 1
        dom = rs[0]["dominant_type"]
        for agent, _, r in members:
            assert r["attribution_weight"] == (4.0 if agent == dom and agent != "core" else 1.0)
    return joints


def test_batch_rendezvous_pairs_a_whole_batch_one_to_one(server, state_root, monkeypatch):
    """2 sessions x 4 agents x n=8 samples, all scored concurrently: 16 joint rollouts, each with one sample of
    every agent, every sample rewarded, no expert fallback."""
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    calls = []
    for s in (1, 2):
        for agent in AGENTS:
            for k in range(8):
                calls.append((policy_outputs(f"s{s}k{k}")[agent], extra_info(state_root, s, agent,
                                                                                  parquet_like=k % 2 == 0)))
    results = asyncio.run(score_batch(calls, api_kwargs(server)))
    assert len(results) == 64
    keys = set(results[0])
    assert all(set(r) == keys for r in results)  # veRL stacks each key across the batch
    assert {"score", "task_reward", "length_penalty", "valid", "dominant_type", "attribution_weight"} <= keys
    check_joints(results, calls, expect_joints=16)
    for r in results:
        assert r["valid"] == 1.0 and r["expert_filled"] == 0 and r["joint_timed_out"] == 0.0
        assert r["score"] == pytest.approx(r["task_reward"] * (1 - 0.8 * r["length_penalty"]))
        assert 0.0 <= r["score"] <= 1.0
    assert any(r["task_reward"] > 0 for r in results)
    stats = httpx.get(server.url + "/stats", headers=AUTH).json()["rendezvous"]
    assert stats["open_slots"] == 0


def test_rendezvous_timeout_falls_back_to_expert(server, state_root, monkeypatch):
    """A session whose procedural samples never come, and one with a surplus core sample: the incomplete joint
    rollouts are scored after the timeout with the expert's output in the missing places."""
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    calls = [(policy_outputs(f"t{k}")[a], extra_info(state_root, 3, a)) for a in AGENTS[:3] for k in range(2)]
    calls += [(policy_outputs(f"u{k}")[a], extra_info(state_root, 4, a)) for a in AGENTS for k in range(2)]
    calls.append((policy_outputs("u-extra")["core"], extra_info(state_root, 4, "core")))
    results = asyncio.run(score_batch(calls, api_kwargs(server, rendezvous_timeout_s=1.0)))
    assert len(results) == len(calls) and all(isinstance(r["score"], float) for r in results)
    s3 = [r for r, (_, i) in zip(results, calls) if i["session_group_id"].endswith("sample3/8")]
    assert all(r["joint_timed_out"] == 1.0 and r["expert_filled"] == 1 for r in s3)
    assert len({r["joint_id"] for r in s3}) == 2
    s4 = [(r, i["agent"]) for r, (_, i) in zip(results, calls) if i["session_group_id"].endswith("sample4/8")]
    full = [r for r, _ in s4 if r["joint_timed_out"] == 0.0]
    extra = [r for r, _ in s4 if r["joint_timed_out"] == 1.0]
    assert len(full) == 8 and len({r["joint_id"] for r in full}) == 2
    assert len(extra) == 1 and extra[0]["expert_filled"] == 3


def test_invalid_policy_sample_in_a_joint_rollout(server, state_root, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    outs = policy_outputs("inv")
    outs["semantic"] = '{"operations": [{"action": "ADD"}]}'  # ADD without its memory
    calls = [(outs[a], extra_info(state_root, 5, a)) for a in AGENTS]
    results = asyncio.run(score_batch(calls, api_kwargs(server)))
    sem = results[AGENTS.index("semantic")]
    assert sem["valid"] == 0.0 and sem["score"] == 0.0 and "memory" in sem["invalid_reason"]
    assert all(r["valid"] == 1.0 for a, r in zip(AGENTS, results) if a != "semantic")
    assert len({r["joint_id"] for r in results}) == 1


def test_sync_wrapper_from_threads_pairs_across_threads(server, state_root, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    calls = [(policy_outputs(f"th{k}")[a], extra_info(state_root, 6, a)) for a in AGENTS for k in range(4)]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        results = list(pool.map(lambda c: rf.compute_score_sync("membuilder", c[0], None, c[1],
                                                                 **api_kwargs(server)), calls))
    check_joints(results, calls, expect_joints=4)


def test_sparse_ablation_through_the_server(server, state_root, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    calls = [(policy_outputs(f"sp{k}")[a], extra_info(state_root, 7, a)) for a in AGENTS for k in range(8)]
    results = asyncio.run(score_batch(calls, api_kwargs(server, sparse_reward_enabled=True)))
    by_joint = defaultdict(list)
    for r in results:
        by_joint[r["joint_id"]].append(r)
    sparse = [j for j, rs in by_joint.items() if rs[0]["sparse"] == 1.0]
    assert 0 < len(sparse) < 8  # a seeded half, per joint rollout
    for j in sparse:
        assert all(r["task_reward"] == 1.0 and r["attribution_weight"] == 1.0 for r in by_joint[j])
    assert all(sorted(r["joint_id"] for r in rs) and len(rs) == 4 for rs in by_joint.values())


def test_bad_state_path_raises_in_the_reward_function(server, state_root, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    info = extra_info(state_root, 1, "core")
    info["state_path"] = "/etc"
    with pytest.raises(rf.RewardServerError, match="403"):
        asyncio.run(score_batch([(policy_outputs("x")["core"], info)], api_kwargs(server)))
    monkeypatch.setenv("REWARD_SERVER_TOKEN", "wrong")
    with pytest.raises(rf.RewardServerError, match="403"):
        asyncio.run(score_batch([(policy_outputs("x")["core"], extra_info(state_root, 1, "core"))],
                                api_kwargs(server)))


def test_local_mode_scores_like_the_server(server, state_root, llm, monkeypatch):
    """`local` runs the same engine in process: the same joint rollout gets the same task reward."""
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    calls = [(policy_outputs("same")[a], extra_info(state_root, 9, a)) for a in AGENTS]
    api = asyncio.run(score_batch(calls, api_kwargs(server)))
    local_cfg = {"state_root": str(state_root), "provider": "openai", "base_url": llm.base_url, "api_key": "x",
                 "embedding_base_url": llm.base_url, "embedding_api_key": "x", "max_in_flight": 8}
    local = asyncio.run(score_batch(calls, {"task_reward_mode": "local", "local": local_cfg,
                                            "rendezvous_timeout_s": 30}))
    for a, b in zip(api, local):
        assert {k: v for k, v in a.items() if k != "joint_id"} == {k: v for k, v in b.items() if k != "joint_id"}


# --------------------------------------------------------------------------- bound and faults

def test_in_flight_bound_holds(state_root, tmp_path):
    with ScriptedServer(memory_responder, latency_s=0.05) as slow:
        with reward_server_process(state_root, slow.base_url, max_in_flight=3) as rs:
            async def go():
                async with httpx.AsyncClient(timeout=120) as h:
                    body = request_body(state_root)
                    rs_ = await asyncio.gather(*(h.post(rs.url + "/build_and_qa", json={**body, "session_group_id":
                                                                                         f"b{i}"}) for i in range(8)))
                    return [r.status_code for r in rs_]

            assert asyncio.run(go()) == [200] * 8
            slots = httpx.get(rs.url + "/stats").json()["engine"]["llm_slots"]
        assert slow.max_in_flight == 3  # reached and never exceeded, as the LLM server saw it
        assert slots["bound"] == 3 and slots["peak"] == 3 and slots["in_flight"] == 0 and slots["busy_slot_s"] > 0


def test_faults_under_load_never_a_wrong_reward(server, state_root):
    """60 concurrent requests, twice, while the LLM server answers 10% HTTP 500 and 10% 429: every request is
    answered 200 with the reward the same request gets without faults, or 503 `retryable` when a call still failed
    after the client's retries; the reward server never answers 500, its memory stays bounded."""
    body = request_body(state_root)
    clean = post(server, "/build_and_qa", body).json()
    with ScriptedServer(memory_responder, fail_500=0.1, fail_429=0.1, seed=3) as faulty:
        with reward_server_process(state_root, faulty.base_url, max_in_flight=16,
                                   extra=["--max-retries", "2"]) as rs:
            async def wave(n: int, tag: str):
                async with httpx.AsyncClient(timeout=300) as h:
                    return await asyncio.gather(*(h.post(rs.url + "/build_and_qa", json={
                        **body, "session_group_id": f"{tag}{i}"}) for i in range(n)))

            first = asyncio.run(wave(60, "a"))
            mem1 = httpx.get(rs.url + "/stats").json()["memory"]
            second = asyncio.run(wave(60, "b"))
            stats = httpx.get(rs.url + "/stats").json()
        injected = {s: len(faulty.requests(status=s)) for s in (500, 429)}
    responses = first + second
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) > 90
    assert injected[500] > 20 and injected[429] > 20
    for r in responses:
        d = r.json()
        if r.status_code == 503:
            assert d["retryable"] is True and d["reason"]
            continue
        assert d["task_reward"] == clean["task_reward"] and d["correct"] == clean["correct"]
        assert d["failed_questions"] == 0 and not any(q["failed"] for q in d["qa_results"])
    # Every request that failed is accounted for by a counted LLM failure.
    failures = stats["engine"]["llm_failures"]
    assert failures["total"] >= codes.count(503) == stats["engine"]["upstream_failures"]
    assert stats["engine"]["state_cache"]["size"] == 1
    mem2 = stats["memory"]
    print(f"\nreward server under faults: {injected} injected, {codes.count(503)} of 120 requests retryable 503, "
          f"rss {mem1['rss_mb']} -> {mem2['rss_mb']} MB, peak {mem2['peak_rss_mb']} MB")
    assert mem2["peak_rss_mb"] < 1024
    assert mem2["rss_mb"] - mem1["rss_mb"] < 64  # a second wave does not grow it


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request, monkeypatch):
    """Both transports of the openai SDK the engine may use: its aiohttp backend (when installed) and httpx."""
    import llm_client

    if request.param == "httpx":
        monkeypatch.setenv("MEMBUILDER_HTTP_BACKEND", "httpx")
    elif not llm_client._aiohttp_backend_available():
        pytest.skip("the openai SDK's aiohttp backend (httpx-aiohttp) is not installed")
    return request.param


def _engine_run(state_root: Path, base_url: str, req_qa: list[dict], **settings):
    from training.reward_server.engine import EngineSettings, RewardEngine, TaskRequest

    engine = RewardEngine(EngineSettings(state_root=str(state_root), base_url=base_url, api_key="x",
                                         embedding_base_url=base_url, embedding_api_key="x", **settings))

    async def go():
        try:
            return await asyncio.gather(*(engine.build_and_qa(TaskRequest(f"g{i}", "expert/state_8",
                                                                          policy_outputs(f"t{i}"), req_qa))
                                          for i in range(4)))
        finally:
            await engine.aclose()

    return asyncio.run(go())


def test_llm_server_without_json_mode(state_root, transport):
    """A server that rejects `response_format` (HTTP 400): the client drops JSON mode and the judge still works."""
    with ScriptedServer(memory_responder, reject_response_format=True) as plain:
        results = _engine_run(state_root, plain.base_url, qa_pairs(4) + [UNKNOWN_QA])
        rejected = plain.requests(status=400)
    assert all(r.failed_questions == 0 and r.correct == 4 for r in results)
    assert len(rejected) >= 1  # a judge call was refused, then retried without JSON mode


def test_transport_retries_rate_limits_and_server_errors(state_root, transport):
    with ScriptedServer(memory_responder, fail_500=0.2, fail_429=0.2, seed=11) as faulty:
        results = _engine_run(state_root, faulty.base_url, qa_pairs(4) + [UNKNOWN_QA], max_retries=8)
        injected = {s: len(faulty.requests(status=s)) for s in (500, 429)}
    assert injected[500] > 0 and injected[429] > 0
    assert all(r.failed_questions == 0 and r.correct == 4 and r.error is None for r in results)


def test_unreachable_llm_server_fails_retryably(state_root):
    """Nothing listens on the LLM port: the request fails with UpstreamError (the server's 503 retryable), never a
    reward of 0 from WRONG questions; the failed call is counted."""
    import socket

    from training.reward_server.engine import EngineSettings, RewardEngine, TaskRequest, UpstreamError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    engine = RewardEngine(EngineSettings(state_root=str(state_root), base_url=dead, api_key="x",
                                         embedding_base_url=dead, embedding_api_key="x", max_retries=1))

    async def go():
        try:
            return await engine.build_and_qa(TaskRequest("g", "expert/state_8", policy_outputs("d"), qa_pairs(3)))
        finally:
            await engine.aclose()

    with pytest.raises(UpstreamError, match="embedding failed"):
        asyncio.run(go())
    assert engine.stats()["llm_failures"]["embed"] == 1 and engine.counters["upstream_failures"] == 1
