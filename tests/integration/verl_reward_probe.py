"""Run under the veRL 0.9.1 environment (.venv-rl): load reward_function.py through veRL's own loader and score a
small batch the way veRL's reward loop does. Prints one JSON object on the last line of stdout.

    .venv-rl/bin/python tests/integration/verl_reward_probe.py WORKDIR

What it exercises, all veRL's code: the config is veRL's generated PPO config; the reward function is set under
`reward.custom_reward_function` (and the legacy top-level key is shown to be ignored by `get_custom_reward_fn`);
`RewardLoopWorker` builds the reward manager with `load_reward_manager` (the `naive` manager, our async
`compute_score`) and scores a DataProto with `compute_score_batch` (every sample in flight at once); the scores and
extra info are assembled as `RewardLoopManager.compute_rm_score` assembles them. Mode `local`, offline provider:
the reward engine runs inside the worker on an expert state built here with the offline embeddings.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

import verl  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402
from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls  # noqa: E402

from llm_client import LLMClient  # noqa: E402
from memory_system import AGENTS  # noqa: E402
from scripts.bench.reward_harness import build_expert_state, policy_outputs, qa_pairs, session_actions  # noqa: E402

N_SAMPLES = 2
SESSIONS = ("longmemeval/probeA/8", "longmemeval/probeB/8")


def byte_tokenizer(directory: Path):
    """A real Hugging Face fast tokenizer (byte-level, no merges) saved where veRL's hf_tokenizer can load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    hf.save_pretrained(str(directory))
    return hf


def make_config(tok_dir: Path, state_root: Path):
    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    with open_dict(cfg):
        cfg.actor_rollout_ref.model.path = str(tok_dir)
        cfg.reward.reward_manager.name = "naive"
        cfg.reward.reward_manager.source = "register"
        cfg.reward.reward_model.enable = False
        cfg.reward.custom_reward_function.path = str(REPO / "training" / "reward_server" / "reward_function.py")
        cfg.reward.custom_reward_function.name = "compute_score"
        cfg.reward.custom_reward_function.reward_kwargs = {
            "task_reward_mode": "local", "rendezvous_timeout_s": 120,
            "local": {"state_root": str(state_root), "provider": "offline", "max_in_flight": 8}}
    return cfg


def legacy_key_ignored(cfg) -> bool:
    legacy = copy.deepcopy(cfg)
    with open_dict(legacy):
        legacy.custom_reward_function.path = cfg.reward.custom_reward_function.path
        legacy.custom_reward_function.name = "compute_score"
        legacy.reward.custom_reward_function.path = None
    return get_custom_reward_fn(legacy) is None


def make_batch(tok, state_path: str) -> tuple[DataProto, list[dict]]:
    rows = []
    for group in SESSIONS:
        for agent in AGENTS:  # one prompt per (session, agent), its n samples next to each other (as veRL repeats)
            for k in range(N_SAMPLES):
                out = policy_outputs(f"{group[-8:]}-{k}")[agent]
                if group == SESSIONS[1] and agent == "core" and k == 1:
                    out = '{"operation": "SKIP"}'  # an invalid sample: the validity gate, not an error
                rows.append({"agent": agent, "group": group, "output": out})
    prompt_len, resp_len = 8, max(len(tok.encode(r["output"])) for r in rows) + 4
    pad = tok.pad_token_id
    prompts, responses, masks = [], [], []
    for r in rows:
        p = tok.encode(f"{r['agent']}:")[:prompt_len]
        p = [pad] * (prompt_len - len(p)) + p
        o = tok.encode(r["output"]) + [tok.eos_token_id]
        responses.append(o + [pad] * (resp_len - len(o)))
        prompts.append(p)
        masks.append([0 if t == pad else 1 for t in p] + [1] * len(o) + [0] * (resp_len - len(o)))
    prompts_t, responses_t = torch.tensor(prompts), torch.tensor(responses)
    extra = [{"session_group_id": r["group"], "agent": r["agent"], "state_path": state_path,
              "qa_pairs": np.array(qa_pairs(5), dtype=object), "expert_outputs": session_actions(8),
              "session_time": "2023-04-02", "sample_id": r["group"].split("/")[1], "session_index": 8}
             for r in rows]
    data = DataProto.from_dict(
        tensors={"prompts": prompts_t, "responses": responses_t, "attention_mask": torch.tensor(masks),
                 "input_ids": torch.cat([prompts_t, responses_t], dim=1)},
        non_tensors={"data_source": np.array(["membuilder"] * len(rows), dtype=object),
                     "reward_model": np.array([{"style": "rule", "ground_truth": ""}] * len(rows), dtype=object),
                     "extra_info": np.array(extra, dtype=object)})
    return data, rows


def main() -> None:
    work = Path(sys.argv[1])
    state_dir = work / "states" / "state_8"
    asyncio.run(build_expert_state(state_dir, LLMClient(provider="offline"), n_sessions=8))
    tok = byte_tokenizer(work / "tokenizer")
    cfg = make_config(work / "tokenizer", work)

    worker = RewardLoopWorker(cfg)  # veRL builds the manager through load_reward_manager
    data, rows = make_batch(tok, str(state_dir))
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))

    # As RewardLoopManager.compute_rm_score assembles them.
    scores = [o["reward_score"] for o in outputs]
    rm_scores = resolve_reward_manager_cls(cfg).assemble_rm_scores(data, scores)
    infos = [o.get("reward_extra_info", {}) for o in outputs]
    keys = list(infos[0].keys())
    non_tensor = {k: np.array([info[k] for info in infos]) for k in keys}
    print(json.dumps({
        "verl_version": getattr(verl, "__version__", "?"),
        "manager": type(worker.reward_manager).__name__,
        "legacy_key_ignored": legacy_key_ignored(cfg),
        "n": len(outputs),
        "rows": [{"agent": r["agent"], "group": r["group"]} for r in rows],
        "scores": scores,
        "rm_scores_row_sums": rm_scores.sum(dim=-1).tolist(),
        "extra_keys": keys,
        "extra_dtypes": {k: str(v.dtype) for k, v in non_tensor.items()},
        "extra": {k: [x.item() if hasattr(x, "item") else x for x in v] for k, v in non_tensor.items()
                  if k in ("joint_id", "attribution_weight", "dominant_type", "valid", "task_reward", "expert_filled",
                           "length_penalty", "invalid_reason")},
    }))


if __name__ == "__main__":
    main()
