"""The whole pipeline against a real model server: llama.cpp serving SmolLM2-135M-Instruct on 127.0.0.1.

A 135M model writes messy output, so these tests assert only what must hold whatever it says: the run completes
(exit 0, or 1 with its failures recorded), every agent call is applied or recorded with its reason, counts add up
between files, memory holds only what parsed, and the reward server answers every request with a documented code.
They never assert accuracy. The server serves one request at a time, so the clients send one at a time
(`--max-in-flight 1`) and the per-attempt timeout is generous; the reply caps are the defaults. A 135M model's
invalid reply is not worth asking again (`--max-retries 0`): these tests measure the pipeline, not the model.
`--json-schema` sends each task's output schema, which llama.cpp turns into a grammar: without it the 135M model
rambles to the reply cap in about half its agent replies (minutes each on 2 cores); with it, replies are short
and well-formed, though their content is still a tiny model's.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest

from memory_system import AGENTS, ENTRY_TYPES, parse_actions
from scripts.local_llm import DEFAULT_ALIAS, LocalLLMServer
from tests.integration.runner_helpers import jsonl, run

pytestmark = [pytest.mark.real_llm, pytest.mark.integration, pytest.mark.slow]
MAIN_JOB_LIMIT_S = 15 * 60


def llm_flags(srv, *, judge: bool = True) -> list[str]:
    out = ["--provider", "openai", "--base-url", srv.base_url, "--api-key", "EMPTY", "--model", DEFAULT_ALIAS,
           "--embedding-base-url", srv.base_url, "--embedding-api-key", "EMPTY", "--embedding-model", DEFAULT_ALIAS,
           "--max-in-flight", "1", "--request-timeout", "600", "--json-schema"]
    return out + (["--judge-model", DEFAULT_ALIAS] if judge else [])


@pytest.mark.timeout(MAIN_JOB_LIMIT_S + 120)
def test_main_job_conv26_three_sessions_twenty_questions(real_llm_available, shared_data, tmp_path, capsys):
    # A server of its own: whatever it still generates when the test ends dies with it.
    with LocalLLMServer(log_path=tmp_path / "server.log") as srv:
        t0 = time.monotonic()
        rc = run("--dataset", "locomo", "--data-dir", str(shared_data), "--conv-id", "conv-26", "--sessions", "3",
                 "--questions-in-built-sessions", "--questions", "20", *llm_flags(srv), "--max-retries", "0",
                 "--db-path", str(tmp_path / "db"), "--output-dir", str(tmp_path / "run"))
        elapsed = time.monotonic() - t0
    print(f"\nconv-26, 3 sessions, 20 questions on llama.cpp/SmolLM2-135M: exit {rc} in {elapsed:.0f} s")
    assert rc in (0, 1), capsys.readouterr().err[-2000:]
    assert elapsed < MAIN_JOB_LIMIT_S
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = summary["build"]
    stopped = b["samples_stopped"]
    attempted = b["sessions_built"] + len(stopped)
    assert b["agent_calls"] == 4 * attempted and 1 <= attempted <= 3
    assert (b["sessions_built"] == 3) or stopped, "a sample is built to the end or stops with its reason"
    mem = json.loads((tmp_path / "db" / "conv-26" / "memory.json").read_text())
    assert len(mem["meta"]["sessions_done"]) == b["sessions_built"]
    for f in b["invalid_outputs"]:  # the model's invalid outputs: recorded against their session, no-op
        assert f["reason"] and f["agent"] in mem["meta"]["session_failures"][f["session_id"]]
    for f in b["agent_failures"]:
        assert f["reason"] and f["kind"] != "invalid"
    assert {e["type"] for e in mem["entries"]} <= set(ENTRY_TYPES)
    assert [e["id"] for e in mem["entries"]] == [f"m{i:06d}" for i in range(len(mem["entries"]))]
    # Every question ends answered and judged, or failed with its reason; the counts add up.
    answers = {a["question_id"]: a for a in jsonl(tmp_path / "run" / "answers.jsonl")}
    judgments = {j["question_id"]: j for j in jsonl(tmp_path / "run" / "judgments.jsonl")}
    assert len(answers) == summary["n_questions"] == 20
    labelled = [q for q, j in judgments.items() if j.get("label")]
    assert all(judgments[q]["label"] in ("CORRECT", "WRONG") for q in labelled)
    assert summary["n_judged"] == len(labelled) and summary["n_failed"] == 20 - len(labelled)
    for q, a in answers.items():
        assert a.get("answer") is not None or a.get("error")
        if q not in labelled:
            assert a.get("error") or (judgments.get(q) or {}).get("error")
    usage = {t: u for stage in summary["usage"].values() for t, u in stage.items()}
    assert all(u["requests"] >= u["calls"] - u["cached"] for u in usage.values() if not u["failures"])
    assert any("also the model that built the memory" in w for w in summary["warnings"])


def _gen_flags(srv) -> list[str]:
    return ["--provider", "openai", "--base-url", srv.base_url, "--api-key", "EMPTY", "--expert-model", DEFAULT_ALIAS,
            "--embedding-base-url", srv.base_url, "--embedding-api-key", "EMPTY", "--embedding-model", DEFAULT_ALIAS,
            "--max-in-flight", "1", "--request-timeout", "600", "--json-schema"]


@pytest.fixture(scope="module")
def expert(local_llm, tmp_path_factory):
    from scripts import generate_expert_trajectories as gen

    out = tmp_path_factory.mktemp("traj")
    rc = gen.main(["--dataset", "demo", "--sessions", "1", "--output-dir", str(out), "--no-progress",
                   "--max-retries", "0", *_gen_flags(local_llm)])
    return out, rc


def test_trajectories_hold_only_what_parsed(expert):
    from training import trajectories as tj

    out, rc = expert
    assert rc in (0, 1)
    path = out / "demo" / "demo-1"
    meta = json.loads((path / tj.METADATA_FILE).read_text())
    calls, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=True)
    assert len(calls) == 4 * meta["sessions_done"]
    produced = Counter()
    for c in calls:
        if c["error"]:
            assert c["actions"] == [] and c["error_kind"] == "invalid"  # endpoint failures are never recorded
            continue
        acts = parse_actions(c["agent"], c["raw_output"])  # what was recorded is exactly what parses
        assert [a.to_dict() for a in acts] == c["actions"]
        produced[c["agent"]] += sum(a.op in ("ADD", "UPDATE", "MERGE") for a in acts)
    final = json.loads((tj.state_dir(path, meta["sessions_done"]) / "memory.json").read_text())
    assert Counter(e["type"] for e in final["entries"]) == Counter({t: n for t, n in produced.items() if n})
    assert meta["n_failed_calls"] == sum(1 for c in calls if c["error"])


def test_sft_and_rl_data_from_the_tiny_model(expert, local_llm, tmp_path, capsys):
    from scripts import convert_trajectories_to_sft as sft
    from scripts import prepare_rl_data as rl
    from training import trajectories as tj

    out, rc = expert
    path = out / "demo" / "demo-1"
    if json.loads((path / tj.METADATA_FILE).read_text())["status"] != "complete":
        pytest.skip("the tiny model's trajectory did not finish (its failure is recorded and tested above)")
    calls, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=False)
    valid = sum(1 for c in calls if not c["error"])
    rc_sft = sft.main(["--trajectory-dir", str(out), "--output-file", str(tmp_path / "sft.json")])
    printed = capsys.readouterr()
    if valid:
        assert rc_sft == 0
        records = json.loads((tmp_path / "sft.json").read_text())
        assert len(records) == valid and f"agent calls: {len(calls)}   kept: {valid}" in printed.out
        for r in records:
            json.loads(r["output"])  # every target is the expert's JSON
    else:
        assert rc_sft == 2 and "no usable agent call" in printed.err
    rc_rl = rl.main(["--trajectories-dir", str(out), "--output-file", str(tmp_path / "rl.parquet"), "--add-qa",
                     "--provider", "openai", "--base-url", local_llm.base_url, "--api-key", "EMPTY", "--model",
                     DEFAULT_ALIAS, "--workers", "1", "--request-timeout", "600", "--no-progress"])
    printed = capsys.readouterr()
    qa = jsonl(path / tj.QA_CACHE_FILE)
    assert len(qa) == 1 and all(r["n_questions"] == 5 for r in qa)
    kept = sum(len(r.get("pairs") or []) for r in qa)
    from scripts.bench.validity_table import render, validity

    print(f"\nsynthetic QA kept from the tiny model: {kept} of {5 * len(qa)}\n{render(validity(out))}")
    if kept:
        assert rc_rl == 0
        import pyarrow.parquet as pq

        rows = pq.read_table(tmp_path / "rl.parquet").to_pylist()
        sessions_with_qa = sum(1 for r in qa if r.get("pairs"))
        assert len(rows) == 4 * sessions_with_qa
        for row in rows:
            assert 1 <= len(row["extra_info"]["qa_pairs"]) <= 5
            assert all(p["question"] and p["answer"] for p in row["extra_info"]["qa_pairs"])
    else:
        assert rc_rl == 2 and "no synthetic QA" in printed.err


def test_reward_server_answers_with_documented_codes(expert, local_llm):
    from scripts.bench.reward_harness import ProcessServer
    from training import trajectories as tj

    out, _ = expert
    path = out / "demo" / "demo-1"
    calls, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=True)
    by_agent = {c["agent"]: c.get("raw_output") or "" for c in calls if c["session_index"] == 0}
    qa = [{"question": "What is the name of my dog?", "answer": "Pepper", "type": "single-session"}]
    argv = ["python", "-m", "training.reward_server.server", "--port", "0", "--state-root", str(out),
            "--provider", "openai", "--base-url", local_llm.base_url, "--api-key", "EMPTY", "--model", DEFAULT_ALIAS,
            "--judge-model", DEFAULT_ALIAS, "--embedding-base-url", local_llm.base_url, "--embedding-api-key", "EMPTY",
            "--embedding-model", DEFAULT_ALIAS, "--max-in-flight", "1", "--request-timeout", "600",
            "--json-schema", "--log-level", "warning"]
    import sys

    argv[0] = sys.executable
    state = str((tj.state_dir(path, 0)).relative_to(out))
    with ProcessServer(argv) as srv:
        r = httpx.post(srv.url + "/build_and_qa", json={"session_group_id": "demo/demo-1/0", "state_path": state,
                                                        "actions": by_agent, "qa_pairs": qa}, timeout=1200)
        assert r.status_code in (200, 503), r.text
        body = r.json()
        if r.status_code == 200:
            assert body["total"] == body["n_questions"] == 1
            assert body["correct"] == sum(q["correct"] for q in body["qa_results"])
            assert body["task_reward"] == body["correct"]
        else:
            assert body["retryable"] is True and body["reason"]

        async def joint() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=1200) as c:
                return await asyncio.gather(*(c.post(srv.url + "/joint_rollout", json={
                    "session_group_id": "demo/demo-1/0#joint", "agent": a, "output": by_agent.get(a, ""),
                    "state_path": state, "qa_pairs": qa[:1], "expert_outputs": by_agent, "timeout_s": 600,
                    "sample_key": f"k-{a}"}) for a in AGENTS))

        replies = asyncio.run(joint())
        codes = [x.status_code for x in replies]
        assert set(codes) <= {200, 503}, [x.text for x in replies]
        if all(c == 200 for c in codes):
            rewards = {x.json()["task_reward"] for x in replies}
            assert len(rewards) == 1, "all four members get the joint rollout's one outcome"
