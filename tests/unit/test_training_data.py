"""Trajectory layout and resume logic, the SFT converter and the RL row builder, on hand-made trajectory folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory_system import AGENTS, parse_actions
from scripts import convert_trajectories_to_sft as sft
from scripts import prepare_rl_data as rl
from training import trajectories as tj

GOOD = {
    "core": '{"operation": "APPEND", "content": "Dana is a nurse in Portland."}',
    "episodic": '{"operations": [{"action": "ADD", "memory": "2023-05-02: Dana adopted Pepper | Details: x"}]}',
    "semantic": '{"operations": [{"action": "SKIP", "reason": "common knowledge"}]}',
    "procedural": '{"operations": []}',
}


def _call(sample_id: str, i: int, agent: str, raw: str | None = None, error: str | None = None) -> dict:
    raw = GOOD[agent] if raw is None and error is None else raw
    return {"call_id": f"{sample_id}/{i}/{agent}", "sample_id": sample_id, "dataset": "longmemeval", "session_index": i,
            "session_id": f"s{i}", "session_time": f"2023/05/0{i + 1} (Tue) 10:00", "state_before": tj.state_relpath(i),
            "agent": agent, "task": f"agent.{agent}",
            "messages": [{"role": "system", "content": f"system for {agent}"},
                         {"role": "user", "content": f"session {i} text for {agent}"}],
            "inputs": {"session_text": f"user: session {i} text", "core": ""}, "raw_output": raw,
            "actions": [], "model": "expert", "latency_s": 0.1, "prompt_tokens": 10, "completion_tokens": 5,
            "attempts": 1, "error": error}


def make_dialogue(root: Path, sample_id: str = "q1", n: int = 3, *, complete: bool = True, done: int | None = None,
                  overrides: dict | None = None) -> Path:
    """A dialogue folder with `done` finished sessions (all of them when complete)."""
    done = n if done is None else done
    path = root / "longmemeval" / sample_id
    for i in range(done + 1):
        d = tj.state_dir(path, i)
        d.mkdir(parents=True)
        (d / "memory.json").write_text(json.dumps({"core": f"core {i}", "entries": [
            {"id": f"m{k:06d}", "type": "episodic", "text": f"entry {k}", "session": f"s{k}", "supersedes": []}
            for k in range(i)], "meta": {}}))
    calls = []
    for i in range(done):
        for a in AGENTS:
            o = (overrides or {}).get((i, a))
            calls.append(_call(sample_id, i, a, **o) if o else _call(sample_id, i, a))
    tj.write_jsonl(path / tj.CALLS_FILE, calls)
    tj.write_json(path / tj.METADATA_FILE, {
        "sample_id": sample_id, "dataset": "longmemeval", "n_sessions": n, "sessions_done": done,
        "status": tj.STATUS_COMPLETE if complete else tj.STATUS_IN_PROGRESS, "expert_model": "expert",
        "sessions": [{"index": i, "id": f"s{i}", "time": f"2023/05/0{i + 1} (Tue) 10:00"} for i in range(n)]})
    return path


# --------------------------------------------------------------------------- JSONL and resume

def test_read_jsonl_partial_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    recs, partial = tj.read_jsonl(p, allow_partial_tail=True)
    assert recs == [{"a": 1}, {"a": 2}] and partial
    with pytest.raises(tj.TrajectoryError, match="truncated"):
        tj.read_jsonl(p, allow_partial_tail=False)
    p.write_text('{"a": 1}\n{"a": 2}\n')
    assert tj.read_jsonl(p, allow_partial_tail=False) == ([{"a": 1}, {"a": 2}], False)
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(tj.TrajectoryError, match="corrupt: line 2"):
        tj.read_jsonl(p, allow_partial_tail=True)
    assert tj.read_jsonl(tmp_path / "missing.jsonl", allow_partial_tail=True) == ([], False)


def _calls(sessions: int, extra_agents: tuple[str, ...] = ()) -> list[dict]:
    out = [_call("q", i, a) for i in range(sessions) for a in AGENTS]
    out += [_call("q", sessions, a) for a in extra_agents]
    return out


def test_plan_resume_starts_at_first_unfinished_session():
    # sessions 0-1 finished; session 2 wrote two call lines but no state: dropped
    plan = tj.plan_resume(_calls(2, ("core", "episodic")), 5, {0, 1, 2})
    assert plan.start == 2 and len(plan.kept_calls) == 8 and plan.dropped_calls == 2 and plan.changed
    # all four calls of session 2 written, killed before its state was renamed into place
    plan = tj.plan_resume(_calls(3), 5, {0, 1, 2})
    assert plan.start == 2 and plan.dropped_calls == 4
    # a state without its calls does not count, and later states are stale
    plan = tj.plan_resume(_calls(1), 5, {0, 1, 2, 3})
    assert plan.start == 1 and plan.stale_states == [2, 3]
    # nothing saved yet
    assert tj.plan_resume([], 5, set()).start == 0
    assert tj.plan_resume(_calls(2), 5, set()).start == 0  # no state_0: start over
    # everything finished
    plan = tj.plan_resume(_calls(5), 5, set(range(6)))
    assert plan.start == 5 and not plan.changed
    # duplicated lines (a re-appended session) are kept once
    plan = tj.plan_resume(_calls(1) + _calls(1), 3, {0, 1})
    assert plan.start == 1 and len(plan.kept_calls) == 4


def test_load_dialogue_checks_finished_dialogues(tmp_path):
    path = make_dialogue(tmp_path, n=2)
    d = tj.load_dialogue(path)
    assert d.complete and d.finished_sessions == 2 and len(d.calls) == 8
    # a torn last line on a finished dialogue is corruption
    with open(path / tj.CALLS_FILE, "a") as fh:
        fh.write('{"call_id": "q1/2/co')
    with pytest.raises(tj.TrajectoryError, match="truncated"):
        tj.load_dialogue(path)
    # a missing state folder
    path2 = make_dialogue(tmp_path, "q2", n=2)
    tj.remove_tree(tj.state_dir(path2, 2))
    with pytest.raises(tj.TrajectoryError, match="missing state"):
        tj.load_dialogue(path2)
    # an unfinished dialogue is refused unless allowed, and then read up to its first unfinished session
    path3 = make_dialogue(tmp_path, "q3", n=4, complete=False, done=2)
    with open(path3 / tj.CALLS_FILE, "a") as fh:
        fh.write('{"partial')
    with pytest.raises(tj.TrajectoryError, match="not finished"):
        tj.load_dialogue(path3)
    d3 = tj.load_dialogue(path3, require_complete=False)
    assert d3.finished_sessions == 2 and len(d3.calls) == 8


def test_find_dialogues(tmp_path):
    with pytest.raises(tj.TrajectoryError, match="not found"):
        tj.find_dialogues(tmp_path / "nope")
    with pytest.raises(tj.TrajectoryError, match="no trajectories"):
        tj.find_dialogues(tmp_path)
    a, b = make_dialogue(tmp_path, "a"), make_dialogue(tmp_path, "b")
    assert tj.find_dialogues(tmp_path) == [a, b]
    assert tj.find_dialogues(tmp_path / "longmemeval") == [a, b]
    assert tj.find_dialogues(a) == [a]


def test_safe_name():
    assert tj.safe_name("conv-26") == "conv-26"
    assert tj.safe_name("a/b c") == "a_b_c"
    assert tj.safe_name("../x") == "x"


# --------------------------------------------------------------------------- SFT targets and records

def test_expert_json_text_keeps_raw_json_and_cuts_wrappers():
    raw = GOOD["episodic"]
    assert sft.expert_json_text("episodic", raw) == (raw, "raw")
    assert sft.expert_json_text("episodic", f"  {raw}\n") == (raw, "raw")
    fenced = f"<think>the user adopted a dog</think>\n```json\n{raw}\n```"
    assert sft.expert_json_text("episodic", fenced) == (raw, "unwrapped")
    prose = f"Here you go: {GOOD['core']} Hope it helps."
    assert sft.expert_json_text("core", prose) == (GOOD["core"], "unwrapped")
    text, kind = sft.expert_json_text("core", '{"operation": "APPEND", "content": "x",}')
    assert kind == "repaired" and json.loads(text) == {"operation": "APPEND", "content": "x"}
    with pytest.raises(sft.Skip, match="unparseable"):
        sft.expert_json_text("semantic", '{"operations": [{"action": "MERGE", "old_memories": ["a"], "new_memory": "b"}]}')
    with pytest.raises(sft.Skip, match="unparseable"):
        sft.expert_json_text("core", '{"operation": "SKIP"}')
    with pytest.raises(sft.Skip, match="no output"):
        sft.expert_json_text("core", None)


def test_call_to_record_and_skips():
    count = sft.TokenCounter(None).count
    rec, kind, n = sft.call_to_record(_call("q", 0, "core"), count, 20000)
    assert rec == {"system": "system for core", "instruction": "session 0 text for core", "input": "",
                   "output": GOOD["core"]}
    assert kind == "raw" and n == (len("system for core") + len("session 0 text for core") + len(GOOD["core"])) // 4
    with pytest.raises(sft.Skip, match="over --max-length"):
        sft.call_to_record(_call("q", 0, "core"), count, 5)
    with pytest.raises(sft.Skip, match="failed call"):
        sft.call_to_record(_call("q", 0, "core", raw=None, error="gave up"), count, 20000)
    bad = _call("q", 0, "core")
    bad["messages"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]
    with pytest.raises(sft.Skip, match="unsupported prompt shape"):
        sft.call_to_record(bad, count, 20000)
    only_user = _call("q", 0, "core")
    only_user["messages"] = only_user["messages"][1:]
    assert sft.call_to_record(only_user, count, 20000)[0]["system"] == ""


def test_convert_counts_kept_and_skipped_and_writes_dataset_info(tmp_path):
    path = make_dialogue(tmp_path, n=2, overrides={(0, "semantic"): {"raw": '{"operations": [{"action": "MERGE"}]}'},
                                                    (1, "core"): {"raw": "partial", "error": "invalid output"}})
    conv = sft.convert([tj.load_dialogue(path)], sft.TokenCounter(None), 20000)
    assert len(conv.records) == 6 and conv.n_skipped == 2
    assert conv.skipped == {"unparseable output": 1, "failed call": 1}
    for rec, agent in zip(conv.records, ["core", "episodic", "procedural", "episodic", "semantic", "procedural"]):
        parse_actions(agent, rec["output"])
    out = tmp_path / "sft" / "data.json"
    (out.parent).mkdir()
    (out.parent / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    sft.write_dataset(conv.records, out, "membuilder_sft")
    info = json.loads((out.parent / "dataset_info.json").read_text())
    assert info["other"] == {"file_name": "o.json"}
    assert info["membuilder_sft"] == {"file_name": "data.json", "formatting": "alpaca", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}
    assert json.loads(out.read_text()) == conv.records
    sft.write_dataset(conv.records, tmp_path / "sft" / "data.jsonl", "as_lines")
    lines = (tmp_path / "sft" / "data.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == conv.records


def test_sft_cli_errors_are_one_line(tmp_path, capsys):
    assert sft.main(["--trajectory-dir", str(tmp_path / "missing"), "--output-file", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trajectory folder not found") and "\n" not in err
    path = make_dialogue(tmp_path, n=2)
    with open(path / tj.CALLS_FILE, "a") as fh:
        fh.write('{"call_id": "q1/2/co')
    assert sft.main(["--trajectory-dir", str(tmp_path), "--output-file", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        sft.main(["--trajectory-dir", str(tmp_path), "--output-file", "x.json", "--max-length", "many"])
    assert exc.value.code == 2 and "\n" not in capsys.readouterr().err.strip()


# --------------------------------------------------------------------------- RL rows

def _qa(n: int = 5) -> dict:
    return {"pairs": [{"question": f"What is fact {k}?", "answer": f"a{k}", "type": "single-session",
                       "source": "current_session"} for k in range(n)], "n_questions": n}


def test_build_rows_four_per_session(tmp_path):
    path = make_dialogue(tmp_path, n=3, overrides={(1, "core"): {"raw": "oops", "error": "invalid output"}})
    d = tj.load_dialogue(path)
    qa = {str(d.path): {0: _qa(), 1: _qa(), 2: _qa()}}
    b = rl.build_rows([d], qa, require_qa=True)
    assert len(b.rows) == 12 and b.sessions == 3 and b.qa_pairs == 15
    groups = {}
    for k, row in enumerate(b.rows):
        e = row["extra_info"]
        assert e["index"] == k and row["data_source"] == "membuilder" and row["ability"] == "memory"
        assert row["reward_model"]["style"] == "rule"
        assert row["prompt"] == d.calls_by_session()[e["session_index"]][e["agent"]]["messages"]
        assert e["state_path"] == str(tj.state_dir(path, e["session_index"]).resolve())
        assert set(e["expert_outputs"]) == set(AGENTS) and len(e["qa_pairs"]) == 5
        groups.setdefault(e["session_group_id"], []).append(e["agent"])
    assert all(agents == list(AGENTS) for agents in groups.values()) and len(groups) == 3
    bad = [r for r in b.rows if r["extra_info"]["session_index"] == 1 and r["extra_info"]["agent"] == "core"][0]
    assert bad["extra_info"]["expert_valid"] is False and bad["reward_model"]["ground_truth"] == ""
    assert bad["extra_info"]["expert_outputs"]["core"] == "" and b.invalid_expert["core"] == 1
    # sessions without QA are left out when QA is required, kept (with an empty list) otherwise
    b2 = rl.build_rows([d], {str(d.path): {0: _qa()}}, require_qa=True)
    assert len(b2.rows) == 4 and b2.sessions_skipped["no synthetic QA"] == 2
    b3 = rl.build_rows([d], {}, require_qa=False)
    assert len(b3.rows) == 12 and b3.sessions_without_qa == 3
    # state paths relative to the reward server's state root
    b4 = rl.build_rows([d], {}, require_qa=False, state_path_base=tmp_path)
    assert b4.rows[5]["extra_info"]["state_path"] == "longmemeval/q1/states/state_1"
    with pytest.raises(tj.TrajectoryError, match="not under"):
        rl.build_rows([d], {}, require_qa=False, state_path_base=tmp_path / "elsewhere")


def test_build_rows_shuffles_whole_sessions_with_a_seed(tmp_path):
    ds = [tj.load_dialogue(make_dialogue(tmp_path, f"q{k}", n=6)) for k in range(3)]
    plain = rl.build_rows(ds, {}, require_qa=False)
    mixed = rl.build_rows(ds, {}, require_qa=False, shuffle_seed=42)
    again = rl.build_rows(ds, {}, require_qa=False, shuffle_seed=42)
    order = lambda b: [r["extra_info"]["session_group_id"] for r in b.rows[::4]]  # noqa: E731
    assert mixed.rows == again.rows and order(mixed) != order(plain) and sorted(order(mixed)) == sorted(order(plain))
    for k in range(0, len(mixed.rows), 4):  # a session's four rows stay adjacent, in agent order
        group = mixed.rows[k:k + 4]
        assert [r["extra_info"]["agent"] for r in group] == list(AGENTS)
        assert len({r["extra_info"]["session_group_id"] for r in group}) == 1
    assert [r["extra_info"]["index"] for r in mixed.rows] == list(range(len(mixed.rows)))


def test_parquet_round_trip_keeps_nested_fields(tmp_path):
    import pyarrow.parquet as pq

    d = tj.load_dialogue(make_dialogue(tmp_path, n=2))
    b = rl.build_rows([d], {str(d.path): {0: _qa()}}, require_qa=False)  # session 1 has no QA: an empty list
    b.rows[0]["extra_info"]["session_time"] = None
    out = tmp_path / "rl" / "train.parquet"
    rl.write_parquet(b.rows, out)
    back = pq.read_table(out).to_pylist()
    assert back == b.rows
    assert back[4]["extra_info"]["qa_pairs"] == [] and back[0]["extra_info"]["qa_pairs"][0]["type"] == "single-session"


def test_rl_cli_errors(tmp_path, capsys):
    assert rl.main(["--trajectories-dir", str(tmp_path / "missing"), "--output-file", str(tmp_path / "o.parquet")]) == 2
    assert capsys.readouterr().err.startswith("error: trajectory folder not found")
    make_dialogue(tmp_path, n=1)
    assert rl.main(["--trajectories-dir", str(tmp_path), "--output-file", str(tmp_path / "o.json")]) == 2
    assert ".parquet" in capsys.readouterr().err
    unfinished = tmp_path / "u"
    make_dialogue(unfinished, n=3, complete=False, done=1)
    assert rl.main(["--trajectories-dir", str(unfinished), "--output-file", str(tmp_path / "o.parquet")]) == 2
    assert "no finished dialogue" in capsys.readouterr().err


def test_token_counter_uses_the_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "BOS", "EOS", "system", "user", "assistant", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}BOS {{ m['role'] }} {{ m['content'] }} EOS {% endfor %}"
    fast.save_pretrained(tmp_path / "tok")
    counter = sft.TokenCounter(str(tmp_path / "tok"))
    assert not counter.estimated
    msgs = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world"}]
    # BOS role content EOS per message, the target as the assistant turn
    assert counter.count(msgs, "world") == 4 + 5 + 4
    assert sft.TokenCounter(None).estimated
