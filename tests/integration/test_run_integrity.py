"""Every number tells the truth (issue 7): each test reproduces one way a run used to report a figure that was not
what it claimed, and asserts the fixed behaviour (exit code, message, files). Real parts on loopback: the scripted
OpenAI-compatible server driven by the real `openai` client, the runner in process or as a subprocess."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from llm_client import LLMCallError, LLMClient, _aiohttp_backend_available, merge_usage
from prompts import Prompt
from scripts.scripted_server import ScriptedServer

pytestmark = pytest.mark.integration
from tests.integration.runner_helpers import ENV, ROOT, demo_args as _common, jsonl as _jsonl, run as _run  # noqa: E402


def _memory(db: Path, sample: str = "demo-1") -> dict:
    return json.loads((db / sample / "memory.json").read_text())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 1. no key, bad key: exit 2 at once

def test_1_no_api_key_and_no_base_url_exits_2_at_once_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "eval.runner", "--dataset", "demo", "--provider", "openai",
                           "--output-dir", str(tmp_path / "o"), "--db-path", str(tmp_path / "db"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in ENV.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")})
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0] and "--api-key" in lines[0]
    assert not (tmp_path / "db" / "demo-1" / "memory.json").exists()


def test_1_a_401_server_exits_2_within_5_s_naming_the_key(tmp_path, capsys):
    with ScriptedServer(fail_tasks={"*": 401}) as srv:
        t0 = time.monotonic()
        assert _run(*_common(srv, tmp_path)) == 2
        elapsed = time.monotonic() - t0
        sent = len(srv.log)
    err = _one_line_error(capsys)
    assert elapsed < 5 and sent == 1, (elapsed, sent)  # the preflight's one request, never retried
    assert "401" in err and "OPENAI_API_KEY" in err and srv.base_url in err


def test_1_an_unknown_model_exits_2_naming_the_flag(tmp_path, capsys):
    with ScriptedServer(fail_tasks={"*": 404}) as srv:
        assert _run(*_common(srv, tmp_path)) == 2
    err = _one_line_error(capsys)
    assert "404" in err and "--model" in err


def test_1_an_unreachable_host_exits_2_naming_base_url(tmp_path, capsys):
    common = ["--dataset", "demo", "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k",
              "--db-path", str(tmp_path / "db"), "--output-dir", str(tmp_path / "run"), "--request-timeout", "2"]
    assert _run(*common) == 2
    err = _one_line_error(capsys)
    assert "127.0.0.1:9" in err and "--base-url" in err


def test_1_a_key_revoked_mid_run_is_not_retried_for_minutes(tmp_path):
    """After the preflight, a 401 fails that call at once and every later call of that client without a request."""
    def flip(task, body):
        return JSONResponse({"error": {"message": "key revoked"}}, 401) if task == "answer" else None

    with ScriptedServer(raw_reply=flip) as srv:
        t0 = time.monotonic()
        assert _run(*_common(srv, tmp_path)) == 1
        assert time.monotonic() - t0 < 20
        answers_sent = len(srv.requests(task_prefix="answer"))
    # each request already in flight (--concurrency 8) gets its 401 once; the rest send nothing, none is retried
    assert answers_sent <= 8
    answers = _jsonl(tmp_path / "run" / "answers.jsonl")
    assert len(answers) == 12 and all(a["answer"] is None and "401" in a["error"] for a in answers)


# --------------------------------------------------------------------------- 2. the failed run, then a rerun

def test_2_failed_work_is_retried_and_the_rerun_equals_an_uninterrupted_run(tmp_path, capsys):
    ref, got = tmp_path / "ref", tmp_path / "got"
    with ScriptedServer() as srv:
        assert _run(*_common(srv, ref)) == 0
    # A 401 server: refused up front, nothing built or marked done.
    with ScriptedServer(fail_tasks={"*": 401}) as srv:
        assert _run(*_common(srv, got)) == 2
    assert not (got / "db" / "demo-1" / "memory.json").exists()
    capsys.readouterr()
    # One agent fails permanently from the third session on: the sample stops there, exit 1.
    calls = Counter()

    def semantic_dies_late(task, body):
        if task == "agent.semantic":
            calls[task] += 1
            if calls[task] > 2:
                return JSONResponse({"error": {"message": "injected outage"}}, 500)
        return None

    with ScriptedServer(raw_reply=semantic_dies_late) as srv:
        assert _run(*_common(srv, got, "--max-retries", "1")) == 1
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "rerun" in out
    meta = _memory(got / "db")["meta"]
    assert len(meta["sessions_done"]) == 2 and meta["stopped"]["session"] == "demo_s3" and not meta["complete"]
    assert "semantic" in meta["stopped"]["agents"] and "500" in meta["stopped"]["reason"]
    summary = json.loads((got / "run" / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["n_failed"] == 12 and summary["accuracy"] is None
    assert summary["provenance"]["stopped"] == ["demo-1"]
    assert all(a["error"].startswith("memory incomplete") for a in _jsonl(got / "run" / "answers.jsonl"))
    # The rerun against a healthy server resumes at s3 and ends identical to the uninterrupted run.
    with ScriptedServer() as srv:
        assert _run(*_common(srv, got)) == 0
        assert len(srv.requests(task_prefix="agent.")) == 4 * 4  # sessions s3..s6 only
    a, b = _memory(ref / "db"), _memory(got / "db")
    assert a["core"] == b["core"] and a["entries"] == b["entries"]
    assert a["meta"]["sessions_done"] == b["meta"]["sessions_done"] and "stopped" not in b["meta"]
    ans = lambda p: {r["question_id"]: (r["answer"], r["retrieved_ids"]) for r in _jsonl(p / "run" / "answers.jsonl")}  # noqa: E731
    assert ans(ref) == ans(got)
    s_ref = json.loads((ref / "run" / "summary.json").read_text())
    s_got = json.loads((got / "run" / "summary.json").read_text())
    assert (s_ref["accuracy"], s_ref["n_correct"]) == (s_got["accuracy"], s_got["n_correct"])


def test_2_invalid_output_is_a_counted_no_op_and_the_session_is_done(tmp_path):
    def responder(task, body):
        from scripts.scripted_server import default_responder

        return "not json at all" if task == "agent.procedural" else default_responder(task, body)

    with ScriptedServer(responder) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "1")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["build"]["agent_outputs_invalid"] == 6 and summary["build"]["agent_calls_failed"] == 0
    assert any("invalid" in w for w in summary["warnings"])
    meta = _memory(tmp_path / "db")["meta"]
    assert meta["complete"] and set(meta["session_failures"]) == {f"demo_s{i}" for i in range(1, 7)}


# --------------------------------------------------------------------------- 3. provenance of the memory

def test_3_answer_mode_reads_who_built_the_memory_and_flags_a_partial_one(tmp_path, capsys):
    db = tmp_path / "db"
    assert _run("--dataset", "demo", "--provider", "offline", "--mode", "build", "--sessions", "2",
                "--db-path", str(db), "--output-dir", str(tmp_path / "b")) == 0
    with ScriptedServer() as srv:
        assert _run("--dataset", "demo", "--mode", "answer", "--provider", "openai", "--base-url", srv.base_url,
                    "--api-key", "k", "--embedding-provider", "offline", "--db-path", str(db),
                    "--output-dir", str(tmp_path / "a")) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["models"]["builder"] == "offline/offline-baseline"
    assert summary["baseline"], "a memory built offline makes the figure a baseline, whoever answers"
    prov = summary["provenance"]
    assert prov["partial"] == ["demo-1"] and prov["sessions_built"] == 2 and prov["sessions_total"] == 6
    assert prov["samples"]["demo-1"]["builder"] == "offline/offline-baseline"
    assert any("partial memory" in w and "2 of 6" in w for w in summary["warnings"])
    assert "WARNING" in out and "2 of 6" in out and "OFFLINE BASELINE" in out
    report = (tmp_path / "a" / "report.md").read_text()
    assert "2 of 6" in report or "partial" in report


# --------------------------------------------------------------------------- 4. a resume keeps the cost of earlier work

def test_4_resumed_run_usage_is_the_sum_of_its_invocations_and_matches_the_server_log(tmp_path):
    def slow_late_judge(task, body):
        return JSONResponse({"error": {"message": "judge down"}}, 503) if task.startswith("judge") and \
            slow_late_judge.down else None

    slow_late_judge.down = True
    with ScriptedServer(raw_reply=slow_late_judge) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "0")) == 1  # every verdict failed
        slow_late_judge.down = False
        assert _run(*_common(srv, tmp_path, "--max-retries", "0")) == 0  # the rerun judges them
        assert _run(*_common(srv, tmp_path, "--max-retries", "0")) == 0  # a full resume: nothing but a preflight
        by_task = Counter(r.task for r in srv.log)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["invocations"]) == 3
    ledger = _jsonl(tmp_path / "run" / "ledger.jsonl")
    assert [r["exit_code"] for r in ledger] == [1, 0, 0]
    totals = merge_usage(*(stage for stage in summary["usage"].values()))
    assert totals == merge_usage(*(r["usage"] for r in ledger))
    assert {t: u["requests"] for t, u in totals.items() if u["requests"]} == dict(by_task)
    assert summary["usage_this_invocation"]["preflight"]  # the last one did nothing else
    assert "build" not in summary["usage_this_invocation"]
    assert totals["agent.core"]["calls"] == 6  # built once, never erased by the resumes
    report = (tmp_path / "run" / "report.md").read_text()
    assert "agent.core" in report


# --------------------------------------------------------------------------- 5. malformed 200 replies

@pytest.mark.parametrize("kind", ["empty_choices", "null_content", "no_message", "html"])
def test_5_a_malformed_200_is_retried_then_recorded_never_an_answer(kind):
    def bad(task, body):
        if kind == "html":
            return HTMLResponse("<html><body>Gateway says hello</body></html>", 200)
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None}}
        if kind == "no_message":
            del choice["message"]
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                   "choices": [] if kind == "empty_choices" else [choice]}
        return JSONResponse(payload, 200)

    with ScriptedServer(raw_reply=bad) as srv:
        client = LLMClient(provider="openai", base_url=srv.base_url, api_key="k", max_retries=2)

        async def go():
            try:
                await client.chat(Prompt("answer", [{"role": "user", "content": "q"}], {}), json_mode=False)
            finally:
                await client.aclose()

        with pytest.raises(LLMCallError) as ei:
            asyncio.run(go())
        assert len(srv.requests(task_prefix="answer")) == 3
    assert "malformed reply" in ei.value.reason and ei.value.kind == "transport"
    snap = client.usage.snapshot()["answer"]
    assert snap["failures"] == 1 and snap["requests"] == 3 and snap["retries"] == 2


def test_5_malformed_answers_are_failed_questions_in_the_run(tmp_path):
    def bad(task, body):
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}) \
            if task == "answer" else None

    with ScriptedServer(raw_reply=bad) as srv:
        assert _run(*_common(srv, tmp_path, "--max-retries", "1")) == 1
        assert not srv.requests(task_prefix="judge")  # nothing to judge: no answer exists
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_failed"] == 12 and summary["n_correct"] == 0 and summary["accuracy"] is None


# --------------------------------------------------------------------------- 6. one run per folder

def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from memory_store import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_6_a_second_run_on_the_same_output_dir_exits_2_naming_the_pid(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    holder = _hold_lock(tmp_path / "run")
    try:
        assert _run("--dataset", "demo", "--provider", "offline", "--db-path", str(tmp_path / "db"),
                    "--output-dir", str(tmp_path / "run")) == 2
        err = _one_line_error(capsys)
        assert f"in use by PID {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is stale and the next run takes it over.
    assert _run("--dataset", "demo", "--provider", "offline", "--db-path", str(tmp_path / "db"),
                "--output-dir", str(tmp_path / "run")) == 0


def test_6_a_second_build_of_the_same_memory_exits_2(tmp_path, capsys):
    holder = _hold_lock(tmp_path / "db" / "demo-1")
    try:
        assert _run("--dataset", "demo", "--provider", "offline", "--db-path", str(tmp_path / "db"),
                    "--output-dir", str(tmp_path / "other-run")) == 2
        assert "memory folder" in _one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()


def test_6_two_trajectory_generators_on_one_folder(tmp_path, capsys):
    from scripts import generate_expert_trajectories as gen

    holder = _hold_lock(tmp_path / "traj" / "demo")
    try:
        assert gen.main(["--dataset", "demo", "--provider", "offline", "--output-dir", str(tmp_path / "traj"),
                         "--no-progress"]) == 2
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_6_concurrent_runs_in_processes_one_wins(tmp_path):
    cmd = [sys.executable, "-m", "eval.runner", "--dataset", "demo", "--provider", "offline", "--db-path",
           str(tmp_path / "db"), "--output-dir", str(tmp_path / "run"), "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes in ([0, 0], [0, 2]), (codes, errs)  # the second either waited its turn out or was refused
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_questions"] == len(_jsonl(tmp_path / "run" / "answers.jsonl")) == 12


# --------------------------------------------------------------------------- 7. a deadline per attempt

def test_7_a_dripping_server_cannot_hang_a_question(tmp_path):
    async def drip():
        for _ in range(120):
            yield b" "
            await asyncio.sleep(0.5)

    def dripping(task, body):
        return StreamingResponse(drip(), media_type="application/json") if task == "answer" else None

    with ScriptedServer(raw_reply=dripping) as srv:
        t0 = time.monotonic()
        rc = _run(*_common(srv, tmp_path, "--request-timeout", "1.5", "--max-retries", "1", "--questions", "2"))
        elapsed = time.monotonic() - t0
    assert rc == 1 and elapsed < 30, elapsed
    answers = _jsonl(tmp_path / "run" / "answers.jsonl")
    assert all(a["answer"] is None and "request timeout" in a["error"] for a in answers)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]["request_timeout_s"] == 1.5


def test_7_the_call_deadline_bounds_all_attempts(tmp_path):
    with ScriptedServer(fail_tasks={"answer": 503}) as srv:
        t0 = time.monotonic()
        rc = _run(*_common(srv, tmp_path, "--questions", "1", "--max-retries", "50", "--call-deadline", "2"))
        assert rc == 1 and time.monotonic() - t0 < 20
    (a,) = _jsonl(tmp_path / "run" / "answers.jsonl")
    assert "deadline" in a["error"]


# --------------------------------------------------------------------------- 8. bad paths and stores: one line

@pytest.mark.parametrize("which", ["--db-path", "--output-dir"])
def test_8_a_path_that_is_a_file_is_one_line_exit_2(tmp_path, capsys, which):
    f = tmp_path / "a-file"
    f.write_text("x")
    paths = {"--db-path": str(tmp_path / "db"), "--output-dir": str(tmp_path / "run"), which: str(f)}
    assert _run("--dataset", "demo", "--provider", "offline", *[x for kv in paths.items() for x in kv]) == 2
    assert which in _one_line_error(capsys)


def test_8_a_path_under_a_file_is_unwritable_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert _run("--dataset", "demo", "--provider", "offline", "--db-path", str(tmp_path / "f" / "db"),
                "--output-dir", str(tmp_path / "run")) == 2
    assert "--db-path" in _one_line_error(capsys)


def _built(tmp_path: Path) -> Path:
    db = tmp_path / "db"
    assert _run("--dataset", "demo", "--provider", "offline", "--mode", "build", "--sessions", "2",
                "--db-path", str(db), "--output-dir", str(tmp_path / "b")) == 0
    return db / "demo-1"


@pytest.mark.parametrize("damage", ["truncated_index", "memory_list", "memory_empty_object", "memory_not_utf8"])
def test_8_a_corrupt_memory_is_one_line_with_the_folder_to_delete(tmp_path, capsys, damage):
    sdir = _built(tmp_path)
    capsys.readouterr()
    if damage == "truncated_index":
        data = (sdir / "index.faiss").read_bytes()
        (sdir / "index.faiss").write_bytes(data[: len(data) // 2])
    elif damage == "memory_list":
        (sdir / "memory.json").write_text("[1, 2]")
    elif damage == "memory_empty_object":
        (sdir / "memory.json").write_text("{}")
    else:
        (sdir / "memory.json").write_bytes(b'{"core": "\xff\xfe"}')
    for mode in ("full", "answer"):
        assert _run("--dataset", "demo", "--provider", "offline", "--mode", mode, "--db-path", str(sdir.parent),
                    "--output-dir", str(tmp_path / "run")) == 2
        err = _one_line_error(capsys)
        assert f"delete {sdir}" in err, err


@pytest.mark.parametrize("ids", [("a", "a"), ("a/b", "a_b")])
def test_8_duplicate_or_colliding_sample_ids_are_refused(tmp_path, capsys, ids):
    from eval.demo_data import DEMO

    samples = []
    for i, sid in enumerate(ids):
        d = json.loads(json.dumps(DEMO[0]))
        d["id"] = sid
        for q in d["questions"]:
            q["id"] = f"{q['id']}-{i}"
        samples.append(d)
    path = tmp_path / "dialogues.json"
    path.write_text(json.dumps(samples))
    assert _run("--dataset", "dialogues", "--dataset-path", str(path), "--provider", "offline",
                "--db-path", str(tmp_path / "db"), "--output-dir", str(tmp_path / "run")) == 2
    err = _one_line_error(capsys)
    assert "twice" in err or "share the memory folder" in err
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())


def test_8_training_converters_refuse_bad_output_paths(tmp_path, capsys):
    from scripts import convert_trajectories_to_sft as sft
    from scripts import generate_expert_trajectories as gen
    from scripts import prepare_rl_data as rl

    traj = tmp_path / "traj"
    assert gen.main(["--dataset", "demo", "--provider", "offline", "--output-dir", str(traj), "--sessions", "2",
                     "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert sft.main(["--trajectory-dir", str(traj), "--output-file", str(tmp_path / "file" / "sft.json")]) == 2
    assert "--output-file" in _one_line_error(capsys)
    (tmp_path / "folder.parquet").mkdir()
    assert rl.main(["--trajectories-dir", str(traj), "--output-file", str(tmp_path / "folder.parquet")]) == 2
    assert "is a folder" in _one_line_error(capsys)
    state = traj / "demo" / "demo-1" / "states" / "state_1" / "memory.json"
    state.write_text("[1, 2]")
    assert rl.main(["--trajectories-dir", str(traj), "--output-file", str(tmp_path / "x.parquet"), "--add-qa",
                    "--provider", "offline", "--no-progress"]) == 2
    assert "memory" in _one_line_error(capsys)


# --------------------------------------------------------------------------- 9. the held-out split

def test_9_training_clis_refuse_test_split_instances(tmp_path):
    from training import trajectories as tj

    test_id = sorted(tj.test_split_ids())[0]
    with pytest.raises(tj.TrajectoryError, match="--allow-test-split"):
        tj.refuse_test_split([("longmemeval", test_id)], allow=False)
    tj.refuse_test_split([("longmemeval", test_id)], allow=True)
    tj.refuse_test_split([("locomo", test_id)], allow=False)  # only LongMemEval has a held-out split


# --------------------------------------------------------------------------- 10. file modes and the HTTP transport

def test_10_outputs_are_0644(tmp_path):
    old = os.umask(0o022)
    try:
        assert _run("--dataset", "demo", "--provider", "offline", "--db-path", str(tmp_path / "db"),
                    "--output-dir", str(tmp_path / "run")) == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "run" / n for n in ("report.md", "accuracy_by_category.png", "summary.json")] + \
             [tmp_path / "db" / "demo-1" / n for n in ("index.faiss", "memory.json")]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_10_the_vendored_aiohttp_transport_is_detected_and_used():
    import openai

    assert _aiohttp_backend_available(), "openai[aiohttp] is in requirements.txt"
    client = LLMClient(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k")

    async def go():
        try:
            return type(client._openai("chat")._client).__mro__
        finally:
            await client.aclose()

    mro = asyncio.run(go())
    assert openai.DefaultAioHttpClient in mro


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    with ScriptedServer(latency_s=0.3) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "eval.runner", *_common(srv, tmp_path), "--no-progress"],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not srv.requests(task_prefix="agent.") and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1 and "rerun" in err and "Traceback" not in err
    ledger = _jsonl(tmp_path / "run" / "ledger.jsonl")
    assert ledger[-1]["exit_code"] == 130 and ledger[-1]["usage"]  # what it spent is still on the books
