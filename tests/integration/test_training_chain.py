"""The training-data chain on the CPU: expert trajectories from the scripted OpenAI-compatible server -> SFT data
-> LLaMA-Factory training on a tiny Qwen3 (sft) and -> veRL parquet loaded by veRL's own RLHFDataset (rl); a killed
generator resumes to the same memory; bad input ends with one line and exit code 2; and the real LongMemEval
sample runs end to end with the offline provider."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.datasets import load_dataset
from llm_client import LLMClient
from memory_system import AGENTS, MemorySystem, parse_actions
from scripts import convert_trajectories_to_sft as sft_cli
from scripts import generate_expert_trajectories as gen_cli
from scripts import prepare_rl_data as rl_cli
from scripts.scripted_server import ScriptedServer
from training import trajectories as tj

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "longmemeval_training_tiny.json"
VENV_SFT = ROOT / ".venv-sft" / "bin" / "python"
VENV_RL = ROOT / ".venv-rl" / "bin" / "python"
EXPERT = "scripted-expert"
N_SESSIONS = 3  # per fixture dialogue


def gen_args(base_url: str, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "longmemeval", "--dataset-path", str(FIXTURE), "--provider", "openai", "--base-url", base_url,
            "--api-key", "test", "--embedding-provider", "openai", "--expert-model", EXPERT, "--output-dir", str(out),
            "--no-progress", *extra]


def client_for(base_url: str) -> LLMClient:
    return LLMClient(provider="openai", model=EXPERT, base_url=base_url, api_key="test", embedding_provider="openai")


def _memory(path: Path) -> dict:
    data = json.loads((path / "memory.json").read_text())
    return {"core": data["core"], "entries": data["entries"]}


def _comparable_calls(path: Path) -> list[dict]:
    drop = {"latency_s"}
    recs, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=False)
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def trajectories(server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trajectories")
    assert gen_cli.main(gen_args(server.base_url, out, "--parallel", "--workers", "2")) == 0
    return out / "longmemeval"


@pytest.fixture(scope="module")
def rl_parquet(trajectories, server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl") / "train.parquet"
    rc = rl_cli.main(["--trajectories-dir", str(trajectories), "--output-file", str(out), "--add-qa",
                      "--qa-per-session", "5", "--provider", "openai", "--model", "scripted-qa",
                      "--base-url", server.base_url, "--api-key", "test", "--no-progress"])
    assert rc == 0
    return out


# --------------------------------------------------------------------------- generator

def test_trajectory_layout_and_records(trajectories, server):
    dialogues = tj.find_dialogues(trajectories)
    assert [d.name for d in dialogues] == ["train_tiny_001", "train_tiny_002"]
    client = client_for(server.base_url)
    sent = {json.dumps(r.body["messages"], sort_keys=True) for r in server.requests(task_prefix="agent.")}
    for path in dialogues:
        meta = json.loads((path / tj.METADATA_FILE).read_text())
        assert meta["status"] == tj.STATUS_COMPLETE and meta["n_sessions"] == N_SESSIONS
        assert meta["expert_model"] == EXPERT and meta["n_agent_calls"] == 4 * N_SESSIONS
        assert [s["id"] for s in meta["sessions"]] == [f"tiny{path.name[-1]}_s{i}" for i in (1, 2, 3)]
        assert tj.existing_states(path) == set(range(N_SESSIONS + 1)) and meta["final_state"] == "states/state_3"
        calls, partial = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=False)
        assert not partial and len(calls) == 4 * N_SESSIONS
        for c in calls:
            assert c["error"] is None and c["model"] == EXPERT and c["task"] == f"agent.{c['agent']}"
            assert c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["latency_s"] >= 0
            assert [a.to_dict() for a in parse_actions(c["agent"], c["raw_output"])] == c["actions"]
            assert json.dumps(c["messages"], sort_keys=True) in sent  # the exact prompt that went to the expert
            assert c["state_before"] == tj.state_relpath(c["session_index"])
        for i in range(N_SESSIONS + 1):  # every state loads
            MemorySystem.load(tj.state_dir(path, i), client)


def test_trajectories_replay_through_the_evaluation_builder(trajectories, server):
    """Prompts rebuilt from state_i equal the recorded ones, and applying the recorded actions to state_i through
    `MemorySystem.apply_actions` gives state_(i+1): the trajectories are the evaluation builder's own."""
    client = client_for(server.base_url)
    samples = {s.id: s for s in load_dataset("longmemeval", dataset_path=FIXTURE)}

    async def replay(path: Path) -> None:
        sample = samples[path.name]
        by_session = tj.session_calls(tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=False)[0])
        for i, session in enumerate(sample.sessions):
            ms = MemorySystem.load(tj.state_dir(path, i), client)
            await ms.ensure_index()
            rebuilt = await ms.prepare_session(session)
            for agent in AGENTS:
                assert rebuilt[agent].messages == by_session[i][agent]["messages"]
                assert rebuilt[agent].inputs == by_session[i][agent]["inputs"]
            actions = {a: parse_actions(a, by_session[i][a]["raw_output"]) for a in AGENTS}
            await ms.apply_actions(actions, session.id)
            assert ms.state.to_dict() == _memory(tj.state_dir(path, i + 1))
        await client.aclose()

    for path in tj.find_dialogues(trajectories):
        asyncio.run(replay(path))


def test_skip_existing_makes_no_requests(trajectories, server, capsys):
    before = len(server.log)
    out = trajectories.parent
    assert gen_cli.main(gen_args(server.base_url, out, "--skip-existing")) == 0
    assert len(server.log) == before
    assert "2 skipped (finished)" in capsys.readouterr().out


def test_failed_agent_calls_are_recorded(tmp_path):
    def responder(task: str, body: dict) -> str:
        from scripts.scripted_server import default_responder

        if task == "agent.semantic":
            return '{"operations": [{"action": "MERGE", "old_memories": ["x"], "new_memory": "y"}]}'  # not allowed
        return default_responder(task, body)

    with ScriptedServer(responder) as srv:
        rc = gen_cli.main(gen_args(srv.base_url, tmp_path, "--sample-id", "train_tiny_001", "--max-retries", "1"))
    assert rc == 0
    path = tmp_path / "longmemeval" / "train_tiny_001"
    calls, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=False)
    semantic = [c for c in calls if c["agent"] == "semantic"]
    assert len(calls) == 12 and len(semantic) == 3
    assert all(c["error"] and "MERGE" in c["error"] and c["actions"] == [] and "MERGE" in c["raw_output"]
               for c in semantic)
    meta = json.loads((path / tj.METADATA_FILE).read_text())
    assert meta["n_failed_calls"] == 3 and all("semantic" in s["failures"] for s in meta["sessions"])


def test_dead_embeddings_endpoint_is_refused_up_front(server, tmp_path, capsys):
    dead = "http://127.0.0.1:9/v1"  # nothing listens there
    rc = gen_cli.main(gen_args(server.base_url, tmp_path, "--embedding-base-url", dead, "--max-retries", "0"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "127.0.0.1:9" in err and "--embedding-base-url" in err
    assert not any((tmp_path / "longmemeval").glob("*/agent_calls.jsonl"))


def test_network_failure_stops_one_sample_and_a_rerun_resumes_it(trajectories, tmp_path, capsys):
    with ScriptedServer(fail_tasks={"embed.entries": 503}) as failing:
        rc = gen_cli.main(gen_args(failing.base_url, tmp_path, "--max-retries", "0"))
    assert rc == 1
    assert "stopped by errors" in capsys.readouterr().out
    for name in ("train_tiny_001", "train_tiny_002"):
        meta = json.loads((tmp_path / "longmemeval" / name / tj.METADATA_FILE).read_text())
        assert meta["status"] == tj.STATUS_IN_PROGRESS and "503" in meta["last_error"]
        assert meta["sessions_done"] == 0
    with ScriptedServer() as healthy:
        assert gen_cli.main(gen_args(healthy.base_url, tmp_path)) == 0
    for name in ("train_tiny_001", "train_tiny_002"):
        got, ref = tmp_path / "longmemeval" / name, trajectories / name
        assert _memory(tj.state_dir(got, N_SESSIONS)) == _memory(tj.state_dir(ref, N_SESSIONS))
        assert "last_error" not in json.loads((got / tj.METADATA_FILE).read_text())


# --------------------------------------------------------------------------- kill and resume

def test_killed_generator_resumes_to_the_same_states(trajectories, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMBUILDER_BACKOFF_BASE": "0.01"}
    with ScriptedServer(latency_s=0.2) as slow:
        cmd = [sys.executable, str(ROOT / "scripts" / "generate_expert_trajectories.py"),
               *gen_args(slow.base_url, out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = out / "longmemeval" / "train_tiny_001"
        deadline = time.time() + 120
        try:
            while not tj.state_dir(first, 2).is_dir():  # two sessions finished: the third is in flight
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "the generator made no progress"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        meta = json.loads((first / tj.METADATA_FILE).read_text())
        assert meta["status"] == tj.STATUS_IN_PROGRESS
        assert not (out / "longmemeval" / "train_tiny_002").exists() or \
            json.loads((out / "longmemeval" / "train_tiny_002" / tj.METADATA_FILE).read_text())["status"] != "complete"
        # a write torn by the kill: a partial line at the end of agent_calls.jsonl
        with open(first / tj.CALLS_FILE, "a") as fh:
            fh.write('{"call_id": "train_tiny_001/2/co')
        n_before = len(slow.log)
        assert gen_cli.main(gen_args(slow.base_url, out)) == 0
        resumed_agent_requests = [r for r in slow.log[n_before:] if r.task.startswith("agent.")]
    # the resumed run did not redo the finished sessions of the first dialogue: at most 1 + 3 sessions x 4 agents
    assert len(resumed_agent_requests) <= 4 * (1 + N_SESSIONS)
    for name in ("train_tiny_001", "train_tiny_002"):
        got, ref = out / "longmemeval" / name, trajectories / name
        assert tj.existing_states(got) == set(range(N_SESSIONS + 1))
        for i in range(N_SESSIONS + 1):
            assert _memory(tj.state_dir(got, i)) == _memory(tj.state_dir(ref, i)), f"{name} state_{i}"
        assert _comparable_calls(got) == _comparable_calls(ref)
        assert json.loads((got / tj.METADATA_FILE).read_text())["status"] == tj.STATUS_COMPLETE
        tj.load_dialogue(got)


def test_skip_existing_extends_a_shorter_run(trajectories, server, tmp_path, capsys):
    assert gen_cli.main(gen_args(server.base_url, tmp_path, "--sessions", "2")) == 0
    path = tmp_path / "longmemeval" / "train_tiny_001"
    assert json.loads((path / tj.METADATA_FILE).read_text())["n_sessions"] == 2
    before = len(server.requests(task_prefix="agent."))
    assert gen_cli.main(gen_args(server.base_url, tmp_path, "--skip-existing")) == 0
    assert len(server.requests(task_prefix="agent.")) - before == 2 * 4  # only the third session of each dialogue
    for name in ("train_tiny_001", "train_tiny_002"):
        got, ref = tmp_path / "longmemeval" / name, trajectories / name
        assert _memory(tj.state_dir(got, N_SESSIONS)) == _memory(tj.state_dir(ref, N_SESSIONS))
        assert _comparable_calls(got) == _comparable_calls(ref)
        assert tj.load_dialogue(got).finished_sessions == N_SESSIONS
    # a different expert may not continue a dialogue it did not start
    assert gen_cli.main(gen_args(server.base_url, tmp_path, "--sessions", "2")) == 0  # regenerate 2 sessions
    capsys.readouterr()
    argv = gen_args(server.base_url, tmp_path, "--skip-existing")
    argv[argv.index("--expert-model") + 1] = "another-expert"
    assert gen_cli.main(argv) == 2
    assert "was generated with expert_model 'scripted-expert'" in capsys.readouterr().err


# --------------------------------------------------------------------------- SFT

def test_sft_data_from_trajectories(trajectories, tmp_path, capsys):
    out = tmp_path / "sft" / "membuilder_sft.json"
    assert sft_cli.main(["--trajectory-dir", str(trajectories), "--output-file", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept: 24" in printed and "skipped: 0" in printed and "characters / 4" in printed
    records = json.loads(out.read_text())
    calls = [c for p in tj.find_dialogues(trajectories) for c in tj.load_dialogue(p).calls]
    assert len(records) == len(calls) == 24
    for rec, call in zip(records, calls):
        assert rec["system"] == call["messages"][0]["content"] and rec["instruction"] == call["messages"][1]["content"]
        assert rec["output"] == call["raw_output"].strip() and rec["input"] == ""
        parse_actions(call["agent"], rec["output"])
    info = json.loads((out.parent / "dataset_info.json").read_text())
    assert info["membuilder_sft"]["file_name"] == "membuilder_sft.json"


@pytest.mark.sft
@pytest.mark.slow
def test_llamafactory_trains_on_converted_data(trajectories, tmp_path):
    """The converted data through the SFT helper's tiny path: `llamafactory-cli train` (LLaMA-Factory 0.9.5, full
    fine-tune, qwen3_nothink) for a few steps on a tiny, locally initialised Qwen3, ending in a saved checkpoint."""
    try:
        from training.sft import tiny
    except ImportError as exc:
        pytest.skip(f"the SFT helper's tiny path (training/sft/tiny.py) is not importable: {exc}")
    if not tiny.llamafactory_cli().exists():
        pytest.skip(f"{tiny.llamafactory_cli()} is absent: run scripts/setup_sft_env.sh to test LLaMA-Factory training")
    data = tmp_path / "sft" / "membuilder_sft.json"
    assert sft_cli.main(["--trajectory-dir", str(trajectories), "--output-file", str(data)]) == 0
    out = tiny.tiny_sft_pipeline(data.parent, "membuilder_sft", tmp_path / "work", max_steps=2, cutoff_len=2048)
    checkpoints = tiny.checkpoint_dirs(out["output_dir"])
    assert checkpoints and any(checkpoints[-1].glob("*.safetensors")), f"no saved checkpoint under {out['output_dir']}"
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("loss" in h for h in state["log_history"])


# --------------------------------------------------------------------------- RL

def test_rl_parquet_rows(rl_parquet, trajectories, server, capsys):
    import pyarrow.parquet as pq

    rows = pq.read_table(rl_parquet).to_pylist()
    dialogues = [tj.load_dialogue(p) for p in tj.find_dialogues(trajectories)]
    assert len(rows) == 4 * N_SESSIONS * len(dialogues)
    groups: dict[str, list[str]] = {}
    for k, row in enumerate(rows):
        e = row["extra_info"]
        d = next(x for x in dialogues if x.sample_id == e["sample_id"])
        call = d.calls_by_session()[e["session_index"]][e["agent"]]
        assert row["prompt"] == call["messages"] and e["index"] == k
        assert row["reward_model"] == {"style": "rule", "ground_truth": call["raw_output"].strip()}
        assert e["expert_outputs"][e["agent"]] == call["raw_output"].strip()
        assert Path(e["state_path"]) == tj.state_dir(d.path, e["session_index"]).resolve()
        assert len(e["qa_pairs"]) == 5 and all(set(q) == {"question", "answer", "type", "source"} for q in e["qa_pairs"])
        groups.setdefault(e["session_group_id"], []).append(e["agent"])
    assert len(groups) == N_SESSIONS * len(dialogues) and all(g == list(AGENTS) for g in groups.values())
    # the QA cache makes a rerun free
    qa_requests = len(server.requests(task_prefix="qa."))
    assert qa_requests == N_SESSIONS * len(dialogues)
    again = rl_parquet.with_name("again.parquet")
    assert rl_cli.main(["--trajectories-dir", str(trajectories), "--output-file", str(again), "--add-qa",
                        "--provider", "openai", "--model", "scripted-qa", "--base-url", server.base_url,
                        "--api-key", "test", "--no-progress"]) == 0
    assert len(server.requests(task_prefix="qa.")) == qa_requests
    assert pq.read_table(again).to_pylist() == rows
    # the QA prompt saw the memory before the session: session 1's prompt lists session 0's entries
    body = next(r.body for r in server.requests(task_prefix="qa.")
                if "Date: 2023/05/14 (Sun) 10:05" in r.body["messages"][1]["content"])
    before = _memory(tj.state_dir(trajectories / "train_tiny_001", 1))
    assert all(e["text"] in body["messages"][1]["content"] for e in before["entries"])


def test_qa_generator_cli_fills_the_cache_that_prepare_rl_data_reads(trajectories, tmp_path, capsys):
    import shutil

    import pyarrow.parquet as pq

    from training import session_qa as qa_generator

    root = tmp_path / "traj"
    shutil.copytree(trajectories, root / "longmemeval")
    for p in root.rglob(tj.QA_CACHE_FILE):
        p.unlink()
    out = tmp_path / "qa.jsonl"
    assert qa_generator.main(["--trajectory-dir", str(root), "--provider", "offline", "--sample-id", "train_tiny_002",
                              "--sessions", "0,2", "--output", str(out)]) == 0
    assert "2 session(s), 10 question(s)" in capsys.readouterr().out
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["sample_id"], r["session_index"], len(r["pairs"])) for r in recs] == [
        ("train_tiny_002", 0, 5), ("train_tiny_002", 2, 5)]
    assert not (root / "longmemeval" / "train_tiny_001" / tj.QA_CACHE_FILE).exists()
    # without --add-qa the cached QA is used as it is, and sessions without any keep an empty list; most rows can
    # then only score 0, which is refused (exit 1, the file kept) unless --allow-empty-qa
    assert rl_cli.main(["--trajectories-dir", str(root), "--output-file", str(tmp_path / "r.parquet"),
                        "--no-progress"]) == 1
    assert "16 of 24" in capsys.readouterr().err
    assert rl_cli.main(["--trajectories-dir", str(root), "--output-file", str(tmp_path / "r.parquet"),
                        "--no-progress", "--allow-empty-qa"]) == 0
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    with_qa = {(r["extra_info"]["sample_id"], r["extra_info"]["session_index"]) for r in rows if r["extra_info"]["qa_pairs"]}
    assert with_qa == {("train_tiny_002", 0), ("train_tiny_002", 2)} and len(rows) == 24
    assert qa_generator.main(["--trajectory-dir", str(root), "--provider", "offline", "--sessions", "7"]) == 2
    assert "has no session 7" in capsys.readouterr().err


VERL_LOADER = r"""
import json, sys
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from omegaconf import OmegaConf
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

parquet, tok_dir, out = sys.argv[1:4]
# a tiny byte-level BPE tokenizer with a ChatML template, trained on the prompts themselves
texts = [m["content"] for r in pq.read_table(parquet).to_pylist() for m in r["prompt"]]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
fast.save_pretrained(tok_dir)
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 200000, "filter_overlong_prompts": True,
                        "filter_overlong_prompts_workers": 1, "truncation": "error", "return_raw_chat": True,
                        "cache_dir": tok_dir + "/cache"})
ds = RLHFDataset(parquet, tokenizer, cfg)
items = [ds[i] for i in range(len(ds))]
batch = collate_fn(items[:8])
assert isinstance(batch["extra_info"][0], dict) and isinstance(batch["extra_info"][0]["qa_pairs"], list)
n_tokens = [len(tokenizer.apply_chat_template(it["raw_prompt"], add_generation_prompt=True, tokenize=True)) for it in items]
json.dump({"rows": [{k: it[k] for k in ("raw_prompt", "extra_info", "reward_model", "data_source", "ability", "index")}
                    for it in items], "n_tokens": n_tokens}, open(out, "w"))
"""


@pytest.mark.rl
@pytest.mark.slow
def test_verl_rlhf_dataset_loads_the_parquet(rl_parquet, trajectories, tmp_path):
    if not VENV_RL.exists():
        pytest.skip(f"{VENV_RL} is absent: run scripts/setup_rl_env.sh to test loading with veRL")
    out = tmp_path / "loaded.json"
    proc = subprocess.run([str(VENV_RL), "-c", VERL_LOADER, str(rl_parquet), str(tmp_path / "tok"), str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(out.read_text())
    rows = loaded["rows"]
    import pyarrow.parquet as pq

    written = pq.read_table(rl_parquet).to_pylist()
    assert len(rows) == len(written) == 4 * N_SESSIONS * 2  # nothing filtered: 4 rows per session
    for got, want in zip(rows, written):
        assert got["raw_prompt"] == want["prompt"]  # veRL's prompt is the recorded prompt
        assert got["extra_info"] == want["extra_info"]  # nested QA pairs and expert outputs round-trip
        assert got["reward_model"] == want["reward_model"] and got["index"] == want["extra_info"]["index"]
        assert got["data_source"] == "membuilder" and got["ability"] == "memory"
    assert min(loaded["n_tokens"]) > 0


# --------------------------------------------------------------------------- bad input

def _one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, trajectories, capsys):
    from training import session_qa as qa_generator

    assert gen_cli.main(["--dataset", "longmemeval", "--dataset-path", str(FIXTURE), "--split", "dev",
                         "--provider", "offline", "--output-dir", str(tmp_path)]) == 2
    assert "unknown split 'dev'" in _one_line(capsys.readouterr().err)
    assert gen_cli.main(["--dataset", "longmemeval", "--dataset-path", str(FIXTURE), "--sample-id", "nope",
                         "--provider", "offline", "--output-dir", str(tmp_path)]) == 2
    assert "unknown sample id" in _one_line(capsys.readouterr().err)
    assert gen_cli.main(["--dataset", "longmemeval", "--dataset-path", str(tmp_path / "missing.json"),
                         "--provider", "offline", "--output-dir", str(tmp_path)]) == 2
    assert "not found" in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--provider", "nonsense"])
    assert exc.value.code == 2
    _one_line(capsys.readouterr().err)
    for main, flag in ((sft_cli.main, "--trajectory-dir"), (rl_cli.main, "--trajectories-dir"),
                       (qa_generator.main, "--trajectory-dir")):
        argv = [flag, str(tmp_path / "no-such-folder")]
        if main is not qa_generator.main:
            argv += ["--output-file", str(tmp_path / "x.parquet")]
        assert main(argv) == 2
        assert "trajectory folder not found" in _one_line(capsys.readouterr().err)
    # a finished dialogue whose agent_calls.jsonl ends in a partial line is corrupt, for every reader
    broken_root = tmp_path / "broken"
    broken = broken_root / "longmemeval" / "train_tiny_001"
    import shutil

    shutil.copytree(trajectories / "train_tiny_001", broken)
    data = (broken / tj.CALLS_FILE).read_bytes()
    (broken / tj.CALLS_FILE).write_bytes(data[: len(data) - 40])
    assert sft_cli.main(["--trajectory-dir", str(broken_root), "--output-file", str(tmp_path / "o.json")]) == 2
    assert "truncated" in _one_line(capsys.readouterr().err)
    assert rl_cli.main(["--trajectories-dir", str(broken_root), "--output-file", str(tmp_path / "o.parquet")]) == 2
    assert "truncated" in _one_line(capsys.readouterr().err)
    assert gen_cli.main(gen_args("http://127.0.0.1:9/v1", broken_root, "--sample-id", "train_tiny_001",
                                 "--skip-existing")) == 2
    assert "truncated" in _one_line(capsys.readouterr().err)


def test_cli_exit_code_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_expert_trajectories.py"), "--dataset",
                           "longmemeval", "--dataset-path", str(FIXTURE), "--split", "dev", "--provider", "offline",
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _one_line(proc.stderr).startswith("error: unknown split 'dev'")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_trajectories_to_sft.py"), "--trajectory-dir",
                           str(tmp_path / "none"), "--output-file", str(tmp_path / "o.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "trajectory folder not found" in _one_line(proc.stderr)


# --------------------------------------------------------------------------- the real LongMemEval sample

REAL_SESSIONS = 8  # of 53: the full run takes about a minute of CPU with the offline embedder (figures in the docs)


@pytest.mark.slow
def test_real_longmemeval_sample_offline(shared_data, tmp_path, capsys):
    sample = shared_data / "longmemeval" / "longmemeval_s_sample.json"
    if not sample.is_file():
        pytest.skip(f"{sample} is absent")
    out = tmp_path / "traj"
    # e47becba is a held-out test instance: every training CLI refuses it unless told otherwise.
    gen = ["--dataset", "longmemeval", "--dataset-path", str(sample), "--provider", "offline", "--output-dir", str(out),
           "--sessions", str(REAL_SESSIONS), "--no-progress"]
    assert gen_cli.main(gen) == 2 and "test split" in capsys.readouterr().err
    assert gen_cli.main([*gen, "--allow-test-split"]) == 0
    path = out / "longmemeval" / "e47becba"
    d = tj.load_dialogue(path)
    assert d.finished_sessions == REAL_SESSIONS and len(d.calls) == 4 * REAL_SESSIONS
    sft = ["--trajectory-dir", str(out), "--output-file", str(tmp_path / "sft" / "d.json")]
    rl = ["--trajectories-dir", str(out), "--output-file", str(tmp_path / "rl.parquet"), "--add-qa", "--provider",
          "offline", "--no-progress"]
    assert sft_cli.main(sft) == 2 and rl_cli.main(rl) == 2
    assert capsys.readouterr().err.count("--allow-test-split") == 2
    assert sft_cli.main([*sft, "--allow-test-split"]) == 0
    assert rl_cli.main([*rl, "--allow-test-split"]) == 0
    printed = capsys.readouterr().out
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "rl.parquet").to_pylist()
    n_sft = len(json.loads((tmp_path / "sft" / "d.json").read_text()))
    print(f"\nreal sample e47becba, first {REAL_SESSIONS} sessions: {len(d.calls)} agent calls, {n_sft} SFT samples, "
          f"{len(rows)} RL rows, {sum(len(r['extra_info']['qa_pairs']) for r in rows) // 4} synthetic questions")
    assert len(rows) == 4 * REAL_SESSIONS and n_sft == 4 * REAL_SESSIONS
    assert all(len(r["extra_info"]["qa_pairs"]) == 5 for r in rows)
    assert "kept: 32" in printed
