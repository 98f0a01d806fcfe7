"""Real servers, real limits (issue 13), on the scripted server taught to ramble, truncate and answer without
retrieval: reply caps on every request, one retry budget per call, figures that warn, endpoints named in errors,
Ctrl-C, and question selection by evidence."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from fastapi.responses import JSONResponse

import config
from eval import runner
from scripts.scripted_server import ScriptedServer, default_responder

pytestmark = pytest.mark.integration
from tests.integration.runner_helpers import ENV, ROOT, demo_args as _common, jsonl as _jsonl, run as _run  # noqa: E402


def _completion(content: str, finish: str = "stop") -> JSONResponse:
    return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


# --------------------------------------------------------------------------- 1. reply caps

def test_every_request_carries_the_cap_of_its_role(tmp_path):
    with ScriptedServer() as srv:
        assert _run(*_common(srv, tmp_path, "--max-tokens-builder", "777", "--max-tokens-judge", "33")) == 0
        caps = {}
        for r in srv.requests(endpoint="chat"):
            caps.setdefault(r.task.split(".")[0], set()).add(r.body.get("max_tokens"))
    assert caps["agent"] == {777} and caps["judge"] == {33}
    assert caps["answer"] == {config.MAX_TOKENS_ANSWER} and caps["preflight"] == {1}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["max_tokens"]["agent"] == 777


def test_a_truncated_agent_reply_is_invalid_not_half_a_json(tmp_path):
    def cut(task, body):
        if task == "agent.semantic":  # a complete-looking object, but the server says it stopped at the cap
            return _completion('{"operations": [{"action": "ADD", "memory": "half of a fa"}]}', "length")
        return None

    with ScriptedServer(raw_reply=cut) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "1")) == 0
        assert len(srv.requests(task_prefix="agent.semantic")) == 6  # a reply cut at the cap is not asked again
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["build"]["agent_outputs_invalid"] == 6
    assert all("finish_reason 'length'" in f["reason"] for f in summary["build"]["invalid_outputs"])
    assert summary["usage"]["build"]["agent.semantic"]["truncated"] == 6
    mem = json.loads((tmp_path / "db" / "demo-1" / "memory.json").read_text())
    assert not any(e["type"] == "semantic" for e in mem["entries"])


def test_a_truncated_judge_reply_is_no_verdict(tmp_path):
    def cut(task, body):
        return _completion('{"label": "CORRECT"}', "length") if task.startswith("judge") else None

    with ScriptedServer(raw_reply=cut) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "0")) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_correct"] == 0 and summary["n_failed"] == 12
    assert summary["usage"]["judge"]["judge.paper"]["truncated"] == 12


# --------------------------------------------------------------------------- 2. one retry budget

def test_transport_and_validity_retries_share_one_budget(tmp_path):
    seen = Counter()

    def mixed(task, body):
        if task == "agent.core":
            seen[task] += 1
            if seen[task] % 2:
                return JSONResponse({"error": {"message": "flaky"}}, 500)
            return _completion("definitely not json")
        return None

    with ScriptedServer(raw_reply=mixed) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "3", "--sessions", "1")) == 0
        n_core = len(srv.requests(task_prefix="agent.core"))
    assert n_core == 4, "1 + max_retries requests in all, whatever mix of faults"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["max_attempts_per_call"] == 4 and summary["settings"]["call_deadline_s"] > 0


# --------------------------------------------------------------------------- 3. figures that warn

def test_an_empty_memory_and_a_judge_that_says_correct_to_anything_are_flagged(tmp_path, capsys):
    def useless(task, body):
        if task.startswith("agent."):
            return '{"operation": "APPEND", "content": ""}' if task == "agent.core" else '{"operations": []}'
        if task == "answer":
            return "Bananas are yellow."
        if task.startswith("judge"):
            return '{"label": "CORRECT"}'
        return default_responder(task, body)

    with ScriptedServer(useless) as srv:
        _run(*_common(srv, tmp_path, "--model", "tiny", "--judge-model", "tiny"))
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    warnings = " | ".join(summary["warnings"])
    assert "empty memory" in warnings and "retrieved no memory" in warnings
    assert "disagree with the lexical metrics" in warnings and summary["judge_check"]["flagged"]
    assert "also the model that built the memory" in warnings
    assert out.count("WARNING") >= 3
    report = (tmp_path / "run" / "report.md").read_text()
    assert "disagree with the lexical metrics" in report


def test_prepare_rl_data_exits_1_when_most_rows_can_only_score_0(tmp_path, capsys):
    from scripts import generate_expert_trajectories as gen
    from scripts import prepare_rl_data as rl

    traj = tmp_path / "traj"
    assert gen.main(["--dataset", "demo", "--provider", "offline", "--output-dir", str(traj), "--sessions", "2",
                     "--no-progress"]) == 0
    out = ["--trajectories-dir", str(traj), "--output-file", str(tmp_path / "rl.parquet")]
    assert rl.main(out) == 1  # no --add-qa and no cached QA: every row's reward is over zero questions
    printed = capsys.readouterr()
    assert "can only score 0" in printed.out and "--allow-empty-qa" in printed.err
    assert rl.main([*out, "--allow-empty-qa"]) == 0
    assert rl.main([*out, "--add-qa", "--provider", "offline", "--no-progress"]) == 0


# --------------------------------------------------------------------------- 4. endpoints named

def test_the_public_judge_is_warned_about_when_the_builder_is_local(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # so the judge's preflight stops before any request
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with ScriptedServer() as srv:
        rc = _run("--dataset", "demo", "--provider", "vllm", "--base-url", srv.base_url, "--embedding-base-url",
                  srv.base_url, "--db-path", str(tmp_path / "db"), "--output-dir", str(tmp_path / "run"))
        assert {r.task for r in srv.log} == {"preflight.chat", "preflight.embed"}
    err = capsys.readouterr().err
    assert "public OpenAI API" in err and "--judge-base-url" in err
    assert rc == 2 and config.OPENAI_PUBLIC_BASE_URL in err.splitlines()[-1]  # the judge's preflight names the host


# --------------------------------------------------------------------------- 6. Ctrl-C in the training CLIs

def test_ctrl_c_in_the_trajectory_generator_is_one_line_and_130(tmp_path):
    with ScriptedServer(latency_s=0.3) as srv:
        cmd = [sys.executable, "-m", "scripts.generate_expert_trajectories", "--dataset", "demo", "--provider",
               "openai", "--base-url", srv.base_url, "--api-key", "k", "--output-dir", str(tmp_path / "t"),
               "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not srv.requests(task_prefix="agent.") and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("20", "INFO"))]  # its log lines aside
    assert lines == [lines[-1]] and "interrupted" in lines[-1] and "Traceback" not in err


# --------------------------------------------------------------------------- 7. questions by evidence

def test_questions_in_built_sessions_keeps_only_answerable_ones(tmp_path, shared_data, capsys):
    from eval.datasets import load_dataset

    (sample,) = load_dataset("locomo", data_dir=shared_data, sample_ids=["conv-26"])
    first3 = {"session_1", "session_2", "session_3"}
    expected = [q.id for q in sample.questions
                if (ev := runner.evidence_sessions(sample, q)) is not None and ev <= first3]
    assert 0 < len(expected) < len(sample.questions)
    assert _run("--dataset", "locomo", "--data-dir", str(shared_data), "--conv-id", "conv-26", "--provider",
                "offline", "--sessions", "3", "--questions-in-built-sessions", "--questions", "20",
                "--db-path", str(tmp_path / "db"), "--output-dir", str(tmp_path / "run")) == 0
    answered = [a["question_id"] for a in _jsonl(tmp_path / "run" / "answers.jsonl")]
    assert sorted(answered) == sorted(expected[:20])
    assert f"{len(expected)} of {len(sample.questions)}" in capsys.readouterr().err


# --------------------------------------------------------------------------- what llama.cpp's server does

def test_a_500_validation_error_is_not_retried_and_json_mode_rejected_as_500_falls_back(tmp_path):
    """llama.cpp's server answers a request it cannot validate with HTTP 500 and a pydantic message (measured in
    docs/local_llm.md): that is no transient fault. When the field it rejects is response_format, JSON mode is dropped
    once, as for a 400."""
    import asyncio

    from llm_client import LLMCallError, LLMClient
    from prompts import Prompt

    def llama_like(task, body):
        if "response_format" in body:
            return JSONResponse({"error": {"message": "1 validation error:\n  {'type': 'literal_error', 'loc': "
                                           "('body', 'response_format', 'type')}"}}, 500)
        if body.get("temperature") == 0.0 and task == "answer":
            return JSONResponse({"error": {"message": "1 validation error:\n  {'type': 'float_type'}"}}, 500)
        return None

    with ScriptedServer(raw_reply=llama_like) as srv:
        client = LLMClient(provider="openai", base_url=srv.base_url, api_key="k", max_retries=3)

        async def go():
            try:
                core = await client.chat(Prompt("agent.core", [{"role": "user", "content": "x"}], {}))
                with pytest.raises(LLMCallError) as ei:
                    await client.chat(Prompt("answer", [{"role": "user", "content": "q"}], {}), json_mode=False)
                return core, ei.value
            finally:
                await client.aclose()

        core, err = asyncio.run(go())
        assert core.text and len(srv.requests(task_prefix="agent.core")) == 2  # with JSON mode, then without
        assert err.kind == "rejected" and len(srv.requests(task_prefix="answer")) == 1


def test_json_schema_sends_each_tasks_output_shape(tmp_path):
    from llm_client import OUTPUT_SCHEMAS

    with ScriptedServer() as srv:
        assert _run(*_common(srv, tmp_path, "--json-schema", "--sessions", "1", "--questions", "1")) == 0
        sent = {r.task: (r.body.get("response_format") or {}).get("schema") for r in srv.requests(endpoint="chat")}
    for task in ("agent.core", "agent.episodic", "agent.semantic", "agent.procedural", "judge.paper"):
        assert sent[task] == OUTPUT_SCHEMAS[task]
    assert sent["answer"] is None  # answers are free text: no JSON mode, no schema
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]["json_schema"] is True
