"""Tiny, fully offline SFT path for tests: a toy tokenizer + toy Qwen3 model,
trained for a few steps with LLaMA-Factory 0.9.5 on CPU.

Two halves with different import needs:

* Model building (``train_tiny_tokenizer``, ``build_tiny_model``, ``main``)
  needs ``tokenizers``/``transformers``/``torch`` and therefore runs INSIDE the
  SFT venv::

      .venv-sft/bin/python -m training.sft.tiny --out DIR [--corpus FILE ...]

* Orchestration (``write_alpaca_dataset``, ``build_tiny_model_in_venv``,
  ``tiny_sft_config``, ``run_tiny_sft``, ``tiny_sft_pipeline``) uses only the
  standard library, so the main environment (pytest) can import it and shell
  out to ``.venv-sft/bin/python`` / ``.venv-sft/bin/llamafactory-cli``.

Nothing is downloaded: the tokenizer is trained here on a small built-in
corpus, the model is randomly initialised, and the subprocesses run with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SFT_VENV = REPO_ROOT / ".venv-sft"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
# Qwen3 keeps these as ordinary added tokens; LLaMA-Factory's `qwen3` template
# (not the `qwen3_nothink` one we train with) writes them.
THINK_TOKENS = ["<think>", "</think>"]

# ChatML rendering, the same layout as LLaMA-Factory's qwen3 / qwen3_nothink
# templates, used by apply_chat_template (inference, vLLM, the RL side).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A few hundred words in the domain of the project (dialogue, dates, memory
# operations as JSON) so that BPE learns some useful merges.
BUILTIN_CORPUS: tuple[str, ...] = (
    "You are a memory agent. Read the conversation session and decide which memory operations to apply.",
    "Return only JSON with a list of operations. Allowed actions: ADD, UPDATE, DELETE, SKIP.",
    '{"operations": [{"action": "ADD", "memory": "2023-05-01: The user adopted a cat named Luna."}]}',
    '{"operations": [{"action": "UPDATE", "memory_id": "3", "memory": "2023-06-12: The user moved to Berlin."}]}',
    '{"operations": [{"action": "DELETE", "memory_id": "7"}]}',
    '{"operations": [{"action": "SKIP"}]}',
    "Core memory: The user is a software engineer who lives in Seattle and likes hiking on weekends.",
    "Episodic memory records events with their dates. Semantic memory records stable facts about the user.",
    "Procedural memory records how the user likes things done, step by step.",
    "Session date: 2023/05/01 (Mon) 10:15. user: I just got back from Lisbon, the trip was amazing!",
    "assistant: That sounds wonderful. What was your favourite part of the trip?",
    "user: The food, definitely. I tried pasteis de nata every single morning.",
    "user: My sister Emma is getting married in September, I need to find a gift.",
    "user: I started training for a half marathon; I run three times a week before work.",
    "Question: When did I adopt my cat? Answer: On May 1, 2023.",
    "The quick brown fox jumps over the lazy dog. 0123456789 January February March April May June",
    "July August September October November December Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
)


# --------------------------------------------------------------------------
# Model building (runs inside .venv-sft)
# --------------------------------------------------------------------------
def _corpus(extra_texts: Iterable[str] = (), extra_files: Iterable[str | os.PathLike] = ()) -> list[str]:
    texts = list(BUILTIN_CORPUS) + [t for t in extra_texts if t]
    for path in extra_files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        # Keep the corpus small: training a BPE on MBs is pointless for a toy.
        texts.extend(line for line in text[:2_000_000].splitlines() if line.strip())
    return texts


def train_tiny_tokenizer(
    extra_texts: Iterable[str] = (),
    extra_files: Iterable[str | os.PathLike] = (),
    vocab_size: int = 1024,
):
    """Train a byte-level BPE with Qwen-style special tokens; return a
    ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``,
    ChatML chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_texts, extra_files), trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.add_tokens(THINK_TOKENS)
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(
    out_dir: str | os.PathLike,
    extra_files: Iterable[str | os.PathLike] = (),
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 32768,
    vocab_size: int = 1024,
) -> Path:
    """Save a tokenizer and a randomly initialised tiny ``Qwen3ForCausalLM``
    (safetensors, fp32) to ``out_dir``; return it."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(extra_files=extra_files, vocab_size=vocab_size)

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # as Qwen3-4B
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
    )
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build a tiny offline Qwen3 model + tokenizer (run inside .venv-sft).")
    p.add_argument("--out", required=True, help="output directory for the model and tokenizer")
    p.add_argument("--corpus", nargs="*", default=[], help="extra text files for the tokenizer corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1024)
    args = p.parse_args(argv)
    out = build_tiny_model(args.out, args.corpus, seed=args.seed, vocab_size=args.vocab_size)
    print(json.dumps({"model_dir": str(out)}))
    return 0


# --------------------------------------------------------------------------
# Orchestration (standard library only; callable from the main env)
# --------------------------------------------------------------------------
def sft_venv(venv: str | os.PathLike | None = None) -> Path:
    """The SFT venv: argument, else $SFT_VENV, else <repo>/.venv-sft."""
    return Path(venv or os.environ.get("SFT_VENV") or DEFAULT_SFT_VENV)


def llamafactory_cli(venv: str | os.PathLike | None = None) -> Path:
    return sft_venv(venv) / "bin" / "llamafactory-cli"


def dataset_info_entry(file_name: str, *, system_column: bool = False) -> dict[str, Any]:
    """The dataset_info.json entry (LLaMA-Factory 0.9.5 schema) for an alpaca file
    of records {"instruction", "input", "output"[, "system"]}."""
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    if system_column:
        columns["system"] = "system"
    return {"file_name": file_name, "formatting": "alpaca", "columns": columns}


def write_alpaca_dataset(
    dataset_dir: str | os.PathLike,
    dataset_name: str,
    records: Sequence[Mapping[str, str]],
    *,
    file_name: str | None = None,
) -> Path:
    """Write ``records`` as ``<dataset_dir>/<file_name>`` and register
    ``dataset_name`` in ``<dataset_dir>/dataset_info.json`` (merged with any
    existing entries). A ``system`` column is declared when any record has one.
    Returns the data file path."""
    d = Path(dataset_dir)
    d.mkdir(parents=True, exist_ok=True)
    file_name = file_name or f"{dataset_name}.json"
    data_path = d / file_name
    data_path.write_text(json.dumps(list(records), ensure_ascii=False, indent=1), encoding="utf-8")
    info_path = d / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[dataset_name] = dataset_info_entry(file_name, system_column=any("system" in r for r in records))
    info_path.write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return data_path


def _offline_env(
    extra: Mapping[str, str] | None = None,
    hf_home: Path | None = None,
    venv: str | os.PathLike | None = None,
) -> dict[str, str]:
    env = dict(os.environ)
    # llamafactory-cli launches multi-process runs with a bare `torchrun` from
    # PATH: without this it would pick another environment's torchrun.
    env["PATH"] = os.pathsep.join([str(sft_venv(venv) / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(sft_venv(venv))
    for k in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "USE_V1", "USE_RAY"):
        env.pop(k, None)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "WANDB_DISABLED": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    if hf_home is not None:
        env.setdefault("HF_HOME", str(hf_home))
    # make `python -m training.sft.tiny` importable from the venv python
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def build_tiny_model_in_venv(
    out_dir: str | os.PathLike,
    corpus_files: Iterable[str | os.PathLike] = (),
    *,
    venv: str | os.PathLike | None = None,
    timeout: float | None = 600,
) -> Path:
    """Run ``python -m training.sft.tiny --out out_dir`` with the SFT venv's python."""
    py = sft_venv(venv) / "bin" / "python"
    cmd = [str(py), "-m", "training.sft.tiny", "--out", str(out_dir)]
    corpus_files = [str(f) for f in corpus_files]
    if corpus_files:
        cmd += ["--corpus", *corpus_files]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=_offline_env(venv=venv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the tiny model failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Path(out_dir)


def tiny_sft_config(
    dataset_dir: str | os.PathLike,
    dataset_name: str,
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_steps: int = 3,
    cutoff_len: int = 1024,
    template: str = "qwen3_nothink",
    learning_rate: float = 1e-3,
    save_steps: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The LLaMA-Factory config for a CPU smoke run of the paper's recipe:
    same stage/finetuning type/template/scheduler, but fp32, no DeepSpeed,
    batch 1, a handful of steps and a checkpoint at the end."""
    cfg: dict[str, Any] = {
        # model
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        # method
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        # dataset
        "dataset": dataset_name,
        "dataset_dir": str(dataset_dir),
        "template": template,
        "cutoff_len": cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        # output
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_steps": save_steps or max_steps,
        "save_only_model": False,
        "plot_loss": False,
        "report_to": "none",
        # train (CPU, fp32)
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        "max_steps": max_steps,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "max_grad_norm": 0.1,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def run_tiny_sft(
    dataset_dir: str | os.PathLike,
    dataset_name: str,
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    max_steps: int = 3,
    cutoff_len: int = 1024,
    *,
    venv: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900,
    log_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> Path:
    """Run ``llamafactory-cli train`` from the SFT venv on CPU for ``max_steps``
    steps and return ``output_dir``. The config is written to
    ``<output_dir>/../<name>_tiny_sft.yaml``; stdout+stderr go to ``log_file``
    (default ``<output_dir>/../<name>_tiny_sft.log``). Raises RuntimeError with
    the log tail on failure."""
    cli = llamafactory_cli(venv)
    if not cli.exists():
        raise FileNotFoundError(f"{cli} not found; run scripts/setup_sft_env.sh")
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sft_config(
        Path(dataset_dir).resolve(), dataset_name, Path(model_dir).resolve(), out,
        max_steps=max_steps, cutoff_len=cutoff_len, **overrides,
    )
    # LLaMA-Factory 0.9.5 reads *.json configs with json.load(Path) (broken),
    # so write JSON text into a .yaml file: JSON is valid YAML for OmegaConf,
    # and the main env needs no PyYAML.
    cfg_path = out.parent / f"{out.name}_tiny_sft.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    log_path = Path(log_file) if log_file else out.parent / f"{out.name}_tiny_sft.log"

    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [str(cli), "train", str(cfg_path)],
            cwd=REPO_ROOT,
            env=_offline_env(env, hf_home=out.parent / ".hf_home", venv=venv),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
        raise RuntimeError(f"llamafactory-cli train failed ({proc.returncode}) after {time.time() - t0:.0f}s:\n{tail}")
    return out


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders under ``output_dir``, by step."""
    dirs = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[-1]))


def tiny_sft_pipeline(
    dataset_dir: str | os.PathLike,
    dataset_name: str,
    work_dir: str | os.PathLike,
    *,
    max_steps: int = 3,
    cutoff_len: int = 1024,
    venv: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Path]:
    """Build the tiny model (its tokenizer also sees the dataset file) and run
    the tiny SFT on a registered dataset. For end-to-end tests
    (trajectories -> SFT data -> train). Returns model_dir and output_dir."""
    work = Path(work_dir)
    info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text(encoding="utf-8"))
    data_file = Path(dataset_dir) / info[dataset_name]["file_name"]
    model_dir = build_tiny_model_in_venv(work / "tiny_model", [data_file], venv=venv)
    output_dir = run_tiny_sft(
        dataset_dir, dataset_name, model_dir, work / "sft_out",
        max_steps=max_steps, cutoff_len=cutoff_len, venv=venv, **overrides,
    )
    return {"model_dir": model_dir, "output_dir": output_dir}


if __name__ == "__main__":
    sys.exit(main())
