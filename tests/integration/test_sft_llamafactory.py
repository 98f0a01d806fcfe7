"""LLaMA-Factory 0.9.5 SFT, for real, on CPU: a tiny offline Qwen3 model is
trained for a few steps on an alpaca dataset shaped like the converter's output.

Runs from the main environment; the work happens in `.venv-sft` (created by
scripts/setup_sft_env.sh) through subprocesses. Skipped when that venv is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from training.sft import tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = tiny.llamafactory_cli()
TRAIN_EXAMPLE = REPO_ROOT / "training" / "sft" / "train_example.sh"

needs_sft_venv = pytest.mark.skipif(
    not CLI.exists(),
    reason=f"{CLI} not found: run `bash scripts/setup_sft_env.sh` to create the LLaMA-Factory venv",
)


def _records() -> list[dict[str, str]]:
    """Records shaped like scripts/convert_trajectories_to_sft.py output:
    instruction = exact prompt, input = "", output = the expert's raw JSON."""
    facts = [
        ("2023-05-01", "The user adopted a cat named Luna."),
        ("2023-05-03", "The user started training for a half marathon."),
        ("2023-05-07", "The user's sister Emma is getting married in September."),
        ("2023-05-09", "The user tried pasteis de nata in Lisbon."),
        ("2023-05-12", "The user moved to Berlin for a new job."),
        ("2023-05-15", "The user prefers running before work."),
    ]
    recs = []
    for i, (date, fact) in enumerate(facts):
        rec = {
            "instruction": (
                "You are the episodic memory agent. Existing memories: (none).\n"
                f"Session date: {date}\nuser: {fact.replace('The user', 'I').replace(' user', ' my')}\n"
                'Return JSON: {"operations": [{"action": "ADD"|"UPDATE"|"DELETE", ...}]}'
            ),
            "input": "",
            "output": json.dumps({"operations": [{"action": "ADD", "memory": f"{date}: {fact}"}]}),
        }
        if i % 2 == 0:  # a system column, as for [system, user] prompts
            rec["system"] = "You build long-term memory from conversations."
        recs.append(rec)
    return recs


def _env_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.sft
@needs_sft_venv
def test_tiny_sft_runs_and_saves_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env_offline(monkeypatch)
    dataset_dir = tmp_path / "data"
    data_file = tiny.write_alpaca_dataset(dataset_dir, "tiny_membuilder_sft", _records())

    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    assert info["tiny_membuilder_sft"] == {
        "file_name": data_file.name,
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
    }

    max_steps = 3
    result = tiny.tiny_sft_pipeline(dataset_dir, "tiny_membuilder_sft", tmp_path / "work", max_steps=max_steps)
    model_dir, out = result["model_dir"], result["output_dir"]

    # the tiny model is a real HF Qwen3 checkpoint with a Qwen-style tokenizer
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 2
    assert (model_dir / "model.safetensors").exists()
    assert "<|im_end|>" in (model_dir / "tokenizer.json").read_text()

    # a checkpoint with weights, and the final model
    ckpts = tiny.checkpoint_dirs(out)
    assert ckpts and ckpts[-1].name == f"checkpoint-{max_steps}", ckpts
    assert (ckpts[-1] / "model.safetensors").stat().st_size > 0
    assert (out / "model.safetensors").exists()

    # the trainer really ran the steps and logged a finite loss for each
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == max_steps and all(0 < x < 100 for x in losses), state["log_history"]
    log_lines = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines() if l.strip()]
    assert max(r["current_steps"] for r in log_lines) == max_steps

    # qwen3_nothink: no (empty) think block was put into the training text
    log = (out.parent / f"{out.name}_tiny_sft.log").read_text(errors="replace")
    assert "training example:" in log
    assert "<think>" not in log


@pytest.mark.integration
@pytest.mark.sft
def test_train_example_dry_run_has_paper_settings() -> None:
    subprocess.run(["bash", "-n", str(TRAIN_EXAMPLE)], check=True)
    env = dict(os.environ, DRY_RUN="1", NPROC="4")
    proc = subprocess.run(
        ["bash", str(TRAIN_EXAMPLE)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    out = proc.stdout
    for line in [
        "model_name_or_path: Qwen/Qwen3-4B-Instruct-2507",
        "stage: sft",
        "finetuning_type: full",
        "deepspeed: training/sft/ds_z2_config.json",
        "dataset: membuilder_sft",
        "dataset_dir: data/sft",
        "template: qwen3_nothink",
        "cutoff_len: 20000",
        "per_device_train_batch_size: 2",
        "gradient_accumulation_steps: 2",
        "learning_rate: 5.0e-7",
        "num_train_epochs: 10",
        "lr_scheduler_type: cosine",
        "warmup_ratio: 0.1",
        "max_grad_norm: 0.1",
        "bf16: true",
    ]:
        assert line in out, line
    assert "FORCE_TORCHRUN=1 NPROC_PER_NODE=4" in out
    assert "llamafactory-cli train" in out
    ds = json.loads((REPO_ROOT / "training" / "sft" / "ds_z2_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.sft
@needs_sft_venv
@pytest.mark.skipif(
    os.environ.get("MEMBUILDER_SFT_DEEPSPEED_TEST") != "1",
    reason="set MEMBUILDER_SFT_DEEPSPEED_TEST=1 to run train_example.sh (DeepSpeed ZeRO-2, bf16) on CPU "
    "with the tiny model (~1 min; ~3 min the first time, when DeepSpeed JIT-builds its CPU comm op)",
)
def test_train_example_deepspeed_zero2_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env_offline(monkeypatch)
    dataset_dir = tmp_path / "data"
    tiny.write_alpaca_dataset(dataset_dir, "tiny_membuilder_sft", _records())
    model_dir = tiny.build_tiny_model_in_venv(tmp_path / "model")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        MODEL_PATH=str(model_dir),
        DATASET_DIR=str(dataset_dir),
        DATASET_NAME="tiny_membuilder_sft",
        OUTPUT_DIR=str(out),
        NPROC="1",
        CUTOFF_LEN="1024",
        PREPROC_WORKERS="1",
        LOGGING_STEPS="1",
    )
    proc = subprocess.run(
        ["bash", str(TRAIN_EXAMPLE), "max_steps=2", "use_cpu=true", "dataloader_num_workers=0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "Creating torch.bfloat16 ZeRO stage 2 optimizer" in proc.stdout + proc.stderr
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
