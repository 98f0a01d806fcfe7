"""The main job end to end: `python -m eval.runner` on the demo, LoCoMo, and the scripted OpenAI-compatible server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from eval import runner
from memory_system import parse_actions
from scripts.scripted_server import ScriptedServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> int:
    return runner.main([*argv, "--no-progress"])


def _load_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _memory(db: Path, sample_id: str) -> dict:
    return json.loads((db / sample_id / "memory.json").read_text())


# --------------------------------------------------------------------------- demo and LoCoMo, offline

def test_demo_offline_writes_a_complete_run_folder(tmp_path):
    out, db = tmp_path / "run", tmp_path / "db"
    assert _run("--dataset", "demo", "--provider", "offline", "--output-dir", str(out), "--db-path", str(db)) == 0
    for name in ("answers.jsonl", "judgments.jsonl", "summary.json", "report.md", "accuracy_by_category.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    answers = _load_jsonl(out / "answers.jsonl")
    judgments = _load_jsonl(out / "judgments.jsonl")
    assert summary["n_questions"] == len(answers) == len(judgments) > 0
    assert summary["baseline"], "an offline run must be labelled a baseline"
    assert "OFFLINE BASELINE" in (out / "report.md").read_text()
    assert {"accuracy", "n_correct", "by_type", "by_sample", "models", "usage", "timing"} <= summary.keys()
    assert summary["n_correct"] == sum(j["label"] == "CORRECT" for j in judgments)
    for a in answers:
        assert {"sample_id", "question_id", "question", "gold", "answer", "type", "retrieved_ids"} <= a.keys()
    for j in judgments:
        assert j["protocol"] == "paper" and j["judge_model"] and j["label"] in ("CORRECT", "WRONG")
    mem = _memory(db, "demo-1")
    assert mem["core"] and mem["entries"]
    assert set(mem["entries"][0]) >= {"id", "type", "text", "session", "supersedes"}
    assert (db / "demo-1" / "index.faiss").is_file()


@pytest.mark.slow
def test_locomo_dev_offline_end_to_end(tmp_path, shared_data):
    out, db = tmp_path / "run", tmp_path / "db"
    rc = _run("--dataset", "locomo", "--data-dir", str(shared_data), "--provider", "offline", "--parallel",
              "--workers", "2", "--concurrency", "16", "--output-dir", str(out), "--db-path", str(db))
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == 2 and summary["n_questions"] == 304
    assert summary["build"]["sessions_built"] == 38 and summary["build"]["agent_calls_failed"] == 0
    assert set(summary["by_category"]) == {"1 multi-hop", "2 temporal", "3 open-domain", "4 single-hop",
                                           "5 adversarial"}
    assert summary["with_adversarial"]["n"] == 304
    assert summary["without_adversarial"]["n"] == 304 - summary["by_category"]["5 adversarial"]["n"]
    assert summary["lexical"]["protocol"].startswith("LoCoMo lexical F1")
    done = {c: len(_memory(db, c)["meta"]["sessions_done"]) for c in ("conv-26", "conv-30")}
    assert sum(done.values()) == 38 and all(_memory(db, c)["meta"]["complete"] for c in done)


# --------------------------------------------------------------------------- scripted OpenAI-compatible server

def _agent_memories(srv: ScriptedServer) -> Counter:
    """Every memory text the scripted entry agents emitted in replies the client accepted."""
    out: Counter = Counter()
    for r in srv.requests(task_prefix="agent.", endpoint="chat", status=200):
        agent = r.task.split(".", 1)[1]
        if agent == "core" or r.fault:
            continue
        for a in parse_actions(agent, r.content):
            out[a.written_text()] += 1
    return out


@pytest.mark.slow
def test_scripted_server_entries_and_accuracy_are_exact(tmp_path, shared_data):
    out, db = tmp_path / "run", tmp_path / "db"
    with ScriptedServer(latency_s=0.0) as srv:
        rc = _run("--dataset", "locomo", "--data-dir", str(shared_data), "--provider", "openai", "--base-url",
                  srv.base_url, "--api-key", "test", "--model", "scripted-builder", "--judge-model", "scripted-judge",
                  "--sessions", "4", "--questions", "25", "--parallel", "--workers", "2",
                  "--output-dir", str(out), "--db-path", str(db))
        assert rc == 0
        emitted = _agent_memories(srv)
        verdicts = [json.loads(r.content)["label"] for r in srv.requests(task_prefix="judge", status=200)]
        answer_models = {r.body.get("model") for r in srv.requests(task_prefix="answer")}
    stored = Counter(e["text"] for conv in ("conv-26", "conv-30") for e in _memory(db, conv)["entries"])
    assert stored == emitted and sum(stored.values()) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_questions"] == 50 == len(verdicts)
    assert summary["n_correct"] == verdicts.count("CORRECT")
    assert summary["accuracy"] == round(100 * verdicts.count("CORRECT") / len(verdicts), 2)
    assert summary["baseline"] is False
    assert answer_models == {"scripted-builder"}


def test_lookahead_gives_the_same_memory_and_answers_in_fewer_round_trips(tmp_path, shared_data):
    """Session queries and questions embedded ahead in batches (the default) against one request each
    (--no-lookahead, as the paper's release): the same memory and the same answers and verdicts."""
    runs = {}
    for name, extra in (("ahead", ()), ("one-by-one", ("--no-lookahead",))):
        out, db = tmp_path / name / "run", tmp_path / name / "db"
        with ScriptedServer() as srv:
            assert _run("--dataset", "locomo", "--data-dir", str(shared_data), "--provider", "openai",
                        "--base-url", srv.base_url, "--api-key", "k", "--sessions", "4", "--questions", "12",
                        "--output-dir", str(out), "--db-path", str(db), *extra) == 0
            embeds = Counter(r.task for r in srv.requests(endpoint="embeddings"))
            agents = [(r.t_start, r.t_end) for r in srv.requests(task_prefix="agent.")]
            queries = [r.t_start for r in srv.requests(endpoint="embeddings") if r.task == "embed.query"]
        mem = {c: [(e["id"], e["type"], e["text"]) for e in _memory(db, c)["entries"]] for c in ("conv-26", "conv-30")}
        answers = sorted((r["question_id"], r["answer"], tuple(r["retrieved_ids"]))
                         for r in _load_jsonl(out / "answers.jsonl"))
        verdicts = sorted((r["question_id"], r["label"]) for r in _load_jsonl(out / "judgments.jsonl"))
        runs[name] = (mem, answers, verdicts, embeds, agents, queries)
    ahead, single = runs["ahead"], runs["one-by-one"]
    assert ahead[0] == single[0] and sum(map(len, ahead[0].values())) > 0
    assert ahead[1] == single[1] and ahead[2] == single[2]
    # Two samples: one batched request of session queries and one of questions each, against one per item.
    assert ahead[3]["embed.session"] == 2 and single[3]["embed.session"] == 2 * 3  # the first session searches nothing
    assert ahead[3]["embed.query"] == 2 and single[3]["embed.query"] == 24
    # In a full run the questions' embeddings are fetched while the memory builds, not after it.
    assert max(ahead[5]) < max(end for _, end in ahead[4])


def test_two_step_evaluation_build_then_answer_with_another_model(tmp_path):
    out, db = tmp_path / "run", tmp_path / "db"
    with ScriptedServer() as srv:
        common = ["--dataset", "demo", "--provider", "openai", "--base-url", srv.base_url, "--api-key", "k",
                  "--db-path", str(db), "--output-dir", str(out)]
        assert _run(*common, "--mode", "build", "--model", "builder-4b") == 0
        n_agent_calls = len(srv.requests(task_prefix="agent."))
        assert n_agent_calls == 4 * 6 and not (out / "summary.json").exists()
        assert _run(*common, "--mode", "answer", "--model", "answerer-mini") == 0
        assert len(srv.requests(task_prefix="agent.")) == n_agent_calls, "answer mode must not rebuild memory"
        assert {r.body["model"] for r in srv.requests(task_prefix="answer")} == {"answerer-mini"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["answer"] == "openai/answerer-mini" and summary["n_failed"] == 0
    mem = _memory(db, "demo-1")
    assert mem["meta"]["builder"] == {"provider": "openai", "model": "builder-4b"}


@pytest.mark.slow
def test_faults_every_session_and_question_is_applied_or_recorded(tmp_path, shared_data):
    out, db = tmp_path / "run", tmp_path / "db"
    with ScriptedServer(fail_500=0.1, fail_429=0.1, malformed=0.1, seed=7) as srv:
        rc = _run("--dataset", "locomo", "--data-dir", str(shared_data), "--provider", "openai", "--base-url",
                  srv.base_url, "--api-key", "k", "--sessions", "6", "--questions", "40", "--max-retries", "1",
                  "--parallel", "--workers", "2", "--concurrency", "8", "--output-dir", str(out),
                  "--db-path", str(db))
        faults = Counter(r.fault for r in srv.log if r.fault)
    assert faults["500"] or faults["429"], faults
    summary = json.loads((out / "summary.json").read_text())
    build = summary["build"]
    stopped = build["samples_stopped"]
    assert rc == (1 if stopped or summary["n_failed"] else 0)
    sessions_done = sum(len(_memory(db, c)["meta"]["sessions_done"]) for c in ("conv-26", "conv-30"))
    assert build["sessions_built"] == sessions_done
    for conv in ("conv-26", "conv-30"):
        meta = _memory(db, conv)["meta"]
        n_done = len(meta["sessions_done"])
        # a sample is built to the end, or stops at its first unbuilt session with the reason recorded
        assert n_done == 6 or (conv in stopped and meta["stopped"]["reason"] == stopped[conv]), (conv, n_done)
    for f in build["agent_failures"]:
        assert f["reason"] and f["agent"] in ("core", "episodic", "semantic", "procedural")
    for f in build["invalid_outputs"]:
        assert f["reason"] and f["session_id"] in _memory(db, f["sample_id"])["meta"]["session_failures"]
    # Every question ends judged or failed with a reason, and the summary counts both; a stopped sample's
    # questions are failed (never answered from the incomplete memory).
    answers = {a["question_id"]: a for a in _load_jsonl(out / "answers.jsonl")}
    judgments = {j["question_id"]: j for j in _load_jsonl(out / "judgments.jsonl")}
    assert len(answers) == summary["n_questions"] == 80
    failed = [q for q, a in answers.items() if a.get("error") or not (judgments.get(q) or {}).get("label")]
    assert summary["n_failed"] == len(failed)
    for q in failed:
        assert answers[q].get("error") or judgments[q].get("error")
    for q, a in answers.items():
        if a["sample_id"] in stopped:
            assert a["answer"] is None and a["error"].startswith("memory incomplete")
    assert summary["n_correct"] + summary["n_failed"] <= summary["n_questions"]


# --------------------------------------------------------------------------- crash safety

def _sessions_on_disk(sdir: Path) -> list[str]:
    """The sessions a memory folder records: its snapshot's, then those its session log appended."""
    try:
        done = list(json.loads((sdir / "memory.json").read_text())["meta"]["sessions_done"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    log = sdir / "log.jsonl"
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            done += json.loads(line)["meta"].get("sessions_done+", [])
        except (json.JSONDecodeError, KeyError):
            break
    return done


def _kill_after(cmd: list[str], env: dict, sdir: Path, n: int) -> int:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = len(_sessions_on_disk(sdir))
        if done >= n:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the build finished before it could be killed")


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["sigkill", "between_vectors_and_record"])
def test_sigkill_mid_build_then_rerun_matches_uninterrupted(tmp_path, shared_data, crash):
    base = [sys.executable, "-m", "eval.runner", "--dataset", "locomo", "--data-dir", str(shared_data),
            "--conv-id", "conv-30", "--provider", "offline", "--mode", "build", "--no-progress"]
    ref_db, db = tmp_path / "ref", tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sdir = db / "conv-30"
    if crash == "sigkill":
        _kill_after([*base, "--db-path", str(db), "--output-dir", str(tmp_path / "o1")], env, sdir, 3)
    else:
        # the process dies after a session's vectors reached the log but before its record did
        proc = subprocess.run([*base, "--db-path", str(db), "--output-dir", str(tmp_path / "o1")], cwd=ROOT,
                              env={**env, "MEMBUILDER_TEST_CRASH_AT_APPEND": "4"}, capture_output=True)
        assert proc.returncode == 137 and (sdir / "vectors.f32").stat().st_size > 0
    partial = _sessions_on_disk(sdir)
    assert 3 <= len(partial) < 19
    subprocess.run([*base, "--db-path", str(db), "--output-dir", str(tmp_path / "o2")], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run([*base, "--db-path", str(ref_db), "--output-dir", str(tmp_path / "o3")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    resumed, reference = json.loads((sdir / "memory.json").read_text()), _memory(ref_db, "conv-30")
    assert resumed["core"] == reference["core"]
    assert resumed["entries"] == reference["entries"]
    assert resumed["meta"]["sessions_done"] == reference["meta"]["sessions_done"]
    assert not (sdir / "log.jsonl").exists(), "a finished sample is compacted"
    build = json.loads((tmp_path / "o2" / "build.json").read_text())["build"]
    assert build["sessions_resumed"] == len(partial)


def test_rerun_of_answer_stage_resumes_without_new_requests(tmp_path):
    out, db = tmp_path / "run", tmp_path / "db"
    with ScriptedServer() as srv:
        common = ["--dataset", "demo", "--provider", "openai", "--base-url", srv.base_url, "--api-key", "k",
                  "--db-path", str(db), "--output-dir", str(out)]
        assert _run(*common) == 0
        work = lambda: [r for r in srv.log if not r.task.startswith("preflight")]  # noqa: E731
        n = len(work())
        first = json.loads((out / "summary.json").read_text())
        assert _run(*common) == 0
        assert len(work()) == n, "a finished run reruns nothing (but its preflight)"
        # A torn last line (a crash mid-append) is dropped and that question redone.
        lines = (out / "judgments.jsonl").read_text().splitlines()
        (out / "judgments.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
        assert _run(*common) == 0
        assert [r.task for r in work()[n:]] == ["judge.paper"]
        assert json.loads((out / "summary.json").read_text())["n_correct"] == first["n_correct"]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "locomo", "--data-dir", "/nonexistent"], "locomo"),
    (["--dataset", "demo", "--sample-id", "no-such-sample"], "no-such-sample"),
    (["--dataset", "nonsense"], "invalid choice"),
    (["--dataset", "demo", "--concurrency", "0"], "--concurrency"),
    (["--dataset", "demo", "--bogus-flag"], "unrecognized"),
    (["--dataset", "longmemeval", "--split", "dev"], "invalid choice"),
    (["--dataset", "demo", "--mode", "answer", "--db-path", "/nonexistent/db"], "run --mode build first"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc_info:
        code = runner.main([*argv, "--no-progress", "--output-dir", str(tmp_path / "o")])
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_malformed_dataset_file_exit_2_as_a_process(tmp_path):
    bad = tmp_path / "locomo10.json"
    bad.write_text('[{"sample_id": "conv-1", "conversation": ')
    proc = subprocess.run([sys.executable, "-m", "eval.runner", "--dataset", "locomo", "--dataset-path", str(bad),
                           "--output-dir", str(tmp_path / "o"), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
