"""ADRPO inside the real veRL 0.9.1 (.venv-rl), driven from the main environment by subprocess.

- the launch script's exact Hydra overrides compose with veRL's config (``--cfg job`` through our entry
  point) and pass veRL's own ``validate_config``;
- veRL's own ``compute_advantage`` dispatches ``adv_estimator="adrpo"`` to our estimator on a real
  ``DataProto``, and the trainer's path (veRL's function, then the attribution weights) equals the hand
  computation: alpha on the dominant agent's samples, never on core, plain GRPO with attribution off;
- the V1 trainer's real ``_compute_advantage`` on a real TransferQueue reads the weight from the
  reward's extra info; a fresh Ray worker running our TaskRunner has both registrations;
- the FSDP -> HF converter script merges a (single-shard) veRL checkpoint.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv-rl" / "bin" / "python"
LAUNCH = ROOT / "scripts" / "run_memory_grpo_multinode.sh"
EPS = 1e-6
ALPHA = 4.0

pytestmark = [pytest.mark.integration, pytest.mark.rl]

needs_venv = pytest.mark.skipif(
    not VENV_PY.exists(), reason=".venv-rl is absent: run scripts/setup_rl_env.sh to create the veRL environment"
)

# One joint-rollout batch of one session: 4 agents x 8 samples, plus a prompt that got a single sample.
# Joint rollouts k=0..2 were dominated by episodic memories, k=3..4 by semantic ones, k=5..7 retrieved
# nothing (no boost). The reward function returns alpha for the dominant agent's sample and 1.0 (or
# nothing) elsewhere; core is never boosted.
REWARDS = {
    "core": [0.8, 0.6, 0.6, 0.0, 1.0, 0.4, 0.6, 0.2],
    "episodic": [1.0, 0.4, 0.4, 0.4, 0.0, 0.6, 0.8, 0.2],
    "semantic": [0.2, 0.2, 0.8, 0.6, 0.0, 0.2, 1.0, 0.2],
    "procedural": [0.4] * 8,
}
BOOSTED = {"episodic": {0, 1, 2}, "semantic": {3, 4}}


def _rows():
    rows = []
    for agent, rewards in REWARDS.items():
        for k, reward in enumerate(rewards):
            weight = ALPHA if k in BOOSTED.get(agent, set()) else (None if k % 3 == 0 else 1.0)
            rows.append({"uid": f"s1-{agent}", "reward": reward, "weight": weight, "length": 3 + (k + len(agent)) % 5})
    rows.append({"uid": "s2-core", "reward": 0.7, "weight": ALPHA, "length": 2})
    return rows


def _hand(rows, weighted=True, alpha=None):
    """PAPER §5 by hand: (r - group mean) / (group stdev + eps), times the weight; 0 for a group of one."""
    out = []
    for row in rows:
        group = [r["reward"] for r in rows if r["uid"] == row["uid"]]
        if len(group) == 1:
            out.append(0.0)
            continue
        value = (row["reward"] - statistics.fmean(group)) / (statistics.stdev(group) + EPS)
        weight = row["weight"] or 1.0
        if weighted and weight != 1.0:
            value *= alpha or weight
        out.append(value)
    return out


def _run_venv(script: str, *args: str, cwd: Path, timeout: int = 900, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("ADRPO_", "REWARD_"))}
    env.update(env_extra or {})
    env.setdefault("RAY_DEDUP_LOGS", "0")
    path = cwd / "check.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [str(VENV_PY), str(path), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"venv script failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return json.loads((cwd / "result.json").read_text())


def launch_overrides(**env) -> list[str]:
    base = {"MODEL_PATH": "/models/sft", "TRAIN_DATA": "/data/rl_train.parquet", "VAL_DATA": "/data/rl_val.parquet"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ADRPO_", "REWARD_", "NNODES", "GPUS_PER_NODE"))}
    proc = subprocess.run(
        ["bash", str(LAUNCH)],
        env={**clean, **base, **env, "PRINT_OVERRIDES": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [line for line in proc.stdout.splitlines() if line]


# --------------------------------------------------------------------------- shell scripts, no venv needed


@pytest.mark.parametrize(
    "script",
    ["run_memory_grpo_multinode.sh", "convert_verl_to_hf.sh", "launch_vllm_openai_server.sh", "setup_rl_env.sh"],
)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def test_launch_overrides_carry_the_paper_hyperparameters():
    overrides = launch_overrides(NNODES="4")
    values = dict(o.lstrip("+").split("=", 1) for o in overrides)
    assert values["algorithm.adv_estimator"] == "adrpo"
    assert values["data.train_batch_size"] == values["actor_rollout_ref.actor.ppo_mini_batch_size"] == "128"
    assert values["actor_rollout_ref.rollout.n"] == "8"
    assert values["reward.custom_reward_function.name"] == "compute_score"
    assert values["reward.custom_reward_function.path"] == str(ROOT / "training/reward_server/reward_function.py")
    assert not any(o.startswith(("custom_reward_function.", "+custom_reward_function.")) for o in overrides)


def test_launch_script_refuses_to_start_without_its_inputs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TRAIN_DATA", "VAL_DATA")}
    proc = subprocess.run(["bash", str(LAUNCH)], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "MODEL_PATH is not set" in proc.stderr


# --------------------------------------------------------------------------- Hydra composition


@needs_venv
def test_cfg_job_composes_the_exact_launch_overrides(tmp_path):
    overrides = launch_overrides(REWARD_SERVER_URL="http://10.0.0.5:8765")
    proc = subprocess.run(
        [str(VENV_PY), "-m", "training.rl.adrpo", *overrides, "--cfg", "job", "--resolve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    parsed = subprocess.run(
        [str(VENV_PY), "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
        input=proc.stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    cfg = json.loads(parsed.stdout)
    actor = cfg["actor_rollout_ref"]["actor"]
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert cfg["algorithm"]["adv_estimator"] == "adrpo"
    assert cfg["algorithm"]["adrpo"] == {"enable_attribution": True, "attribution_boost_factor": None}
    assert cfg["algorithm"]["use_kl_in_reward"] is False
    assert actor["optim"]["lr"] == pytest.approx(1e-6)
    assert (actor["use_kl_loss"], actor["kl_loss_coef"], actor["kl_loss_type"]) == (True, 0.02, "low_var_kl")
    assert actor["entropy_coeff"] == 0
    assert actor["clip_ratio"] == actor["clip_ratio_low"] == actor["clip_ratio_high"] == 0.2
    assert actor["ppo_mini_batch_size"] == cfg["data"]["train_batch_size"] == 32
    assert actor["ppo_epochs"] == 1
    assert actor["strategy"] == "fsdp" and actor["fsdp_config"]["dtype"] == "bfloat16"
    assert (rollout["name"], rollout["n"], rollout["temperature"], rollout["top_p"]) == ("vllm", 8, 0.8, 0.9)
    assert rollout["dtype"] == "bfloat16"
    assert (rollout["prompt_length"], rollout["response_length"]) == (20000, 6000)
    assert (cfg["data"]["max_prompt_length"], cfg["data"]["max_response_length"]) == (20000, 6000)
    assert cfg["data"]["shuffle"] is False
    assert cfg["trainer"]["total_epochs"] == 5
    assert cfg["trainer"]["use_v1"] is True and cfg["trainer"]["v1"]["trainer_mode"] == "adrpo_sync"
    reward_fn = cfg["reward"]["custom_reward_function"]
    assert reward_fn["path"] == str(ROOT / "training/reward_server/reward_function.py")
    assert reward_fn["name"] == "compute_score"
    assert reward_fn["reward_kwargs"]["memory_api_url"] == "http://10.0.0.5:8765"
    assert reward_fn["reward_kwargs"]["config_path"] == str(ROOT / "training/reward_server/reward_config.json")


# --------------------------------------------------------------------------- advantages inside veRL

VENV_CHECKS = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])  # the repository, for this driver only; Ray workers get it from runtime_env
t0 = time.time()
import numpy as np, torch
from training.rl import adrpo
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

rows = json.loads(sys.argv[2])
overrides = json.loads(sys.argv[3])
out = {"timings": {"imports_s": time.time() - t0}}

# ---- composition: the launch overrides, prepared for ADRPO, pass veRL's own validation
cfg = adrpo.compose_config(overrides)
env = {"REWARD_CONFIG": "/cfg/reward.json", "REWARD_SERVER_TOKEN": "secret", "PYTHONPATH": "/other"}
settings = adrpo.prepare_config(cfg, env=env)
validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
out["compose"] = {
    "settings": [settings.enable_attribution, settings.attribution_boost_factor],
    "trainer_mode": cfg.trainer.v1.trainer_mode,
    "env_vars": dict(cfg.ray_kwargs.ray_init.runtime_env.env_vars),
    "need_critic": need_critic(cfg),
    "need_ref": need_reference_policy(cfg),
}
for extra, name in ((["algorithm.adrpo.enable_attribution=False"], "off"),
                    (["algorithm.adrpo.attribution_boost_factor=8"], "alpha8")):
    c = adrpo.compose_config(overrides + extra)
    s = adrpo.prepare_config(c, env={})
    out["compose"][name] = [s.enable_attribution, s.attribution_boost_factor]
errors = {}
for extra, name in ((["trainer.use_v1=False"], "legacy"), (["trainer.v1.trainer_mode=separate_async"], "async")):
    try:
        adrpo._run(adrpo.compose_config(overrides + extra))
        errors[name] = None
    except adrpo.ADRPOConfigError as exc:
        errors[name] = str(exc)
out["compose"]["errors"] = errors

# ---- a real DataProto through veRL's own compute_advantage
L = max(r["length"] for r in rows)
def batch():
    rewards = torch.zeros(len(rows), L)
    mask = torch.zeros(len(rows), L, dtype=torch.int64)
    for i, r in enumerate(rows):
        mask[i, : r["length"]] = 1
        rewards[i, r["length"] - 1] = r["reward"]
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": np.array([r["uid"] for r in rows], dtype=object),
                     "attribution_weight": np.array([r["weight"] for r in rows], dtype=object)},
    )
def first_token(data):
    return data.batch["advantages"][:, 0].tolist()
def masked_ok(data):
    adv, mask = data.batch["advantages"], data.batch["response_mask"].bool()
    rows_const = all(torch.allclose(adv[i][mask[i]], adv[i, 0].expand(int(mask[i].sum()))) for i in range(len(adv)))
    return bool(rows_const and adv[~mask].abs().sum().item() == 0 and torch.equal(adv, data.batch["returns"]))

algo = cfg.algorithm
out["registered_fn_is_ours"] = core_algos.get_adv_estimator_fn("adrpo") is adrpo.compute_adrpo_advantage
own = verl_compute_advantage(batch(), adv_estimator="adrpo", config=algo)
out["verl_own"] = first_token(own)
out["verl_own_masked_ok"] = masked_ok(own)
weighted = adrpo.compute_advantage(batch(), adv_estimator="adrpo", config=algo)
out["trainer_path"] = first_token(weighted)
out["trainer_path_masked_ok"] = masked_ok(weighted)
c = adrpo.compose_config(overrides + ["algorithm.adrpo.enable_attribution=False"]); adrpo.prepare_config(c, env={})
out["attribution_off"] = first_token(adrpo.compute_advantage(batch(), adv_estimator="adrpo", config=c.algorithm))
c = adrpo.compose_config(overrides + ["algorithm.adrpo.attribution_boost_factor=8"]); adrpo.prepare_config(c, env={})
out["alpha8"] = first_token(adrpo.compute_advantage(batch(), adv_estimator="adrpo", config=c.algorithm))
out["verl_grpo"] = first_token(verl_compute_advantage(batch(), adv_estimator="grpo", config=algo))
direct, _ = adrpo.compute_adrpo_advantage(batch().batch["token_level_rewards"], batch().batch["response_mask"],
                                          np.array([r["uid"] for r in rows], dtype=object),
                                          attribution_weight=[r["weight"] for r in rows], config=algo)
out["direct"] = direct[:, 0].tolist()
out["timings"]["dataproto_s"] = time.time() - t0

# ---- Ray: our TaskRunner in a fresh worker process, and the V1 trainer's _compute_advantage on TransferQueue
import ray
import transfer_queue as tq
from omegaconf import OmegaConf
from transfer_queue import KVBatchMeta
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
         runtime_env=adrpo.build_runtime_env_additions(env={}))
runner = adrpo.ADRPOTaskRunner.remote()
status_ref = runner.adrpo_registration.remote()  # the worker imports veRL while the driver goes on

tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1, "total_storage_size": 10000}}}))
keys = []
for i, r in enumerate(rows):
    info = {"score": r["reward"]}
    if r["weight"] is not None:
        info["attribution_weight"] = r["weight"]
    rm_scores = torch.zeros(r["length"])
    rm_scores[-1] = r["reward"]
    field = {"uid": r["uid"], "response_mask": torch.ones(r["length"], dtype=torch.int64), "rm_scores": rm_scores,
             "extra_fields": {"reward_extra_info": info, "turn_scores": []}}
    key = f"{r['uid']}_{i}_0"  # the agent loop's {uid}_{session_id}_{index}, one put per sample
    tq.kv_batch_put(keys=[key], partition_id="train", fields=list_of_dict_to_tensordict([field]),
                    tags=[{"status": "success"}])
    keys.append(key)
# veRL's own lookup and constructor, as TaskRunnerV1.run does them; init() (workers, GPUs) is not called
from verl.trainer.ppo.v1 import get_trainer_cls
trainer_cfg = adrpo.compose_config(overrides)
adrpo.prepare_config(trainer_cfg, env={})
OmegaConf.resolve(trainer_cfg)
trainer_cls = get_trainer_cls(trainer_cfg.trainer.v1.trainer_mode)
trainer = trainer_cls(config=trainer_cfg)
out["v1_trainer"] = {"class": trainer_cls.__name__, "mode": trainer.trainer_mode,
                     "config_mode": trainer_cfg.trainer.v1.trainer_mode,
                     "replay_buffer": type(trainer.replay_buffer).__name__}
metrics = {}
meta = KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train")
trainer._compute_advantage(meta, metrics=metrics)
got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages", "returns"])
out["v1_tq"] = [row.tolist() for row in got["advantages"].unbind()]
out["v1_tq_returns_equal"] = all(torch.equal(a, b) for a, b in zip(got["advantages"].unbind(), got["returns"].unbind()))
out["v1_metrics"] = metrics
out["taskrunner"] = ray.get(status_ref, timeout=600)
out["driver_pid"] = os.getpid()
out["timings"]["ray_s"] = time.time() - t0
tq.close()
ray.shutdown()
json.dump(out, open("result.json", "w"))
"""


@pytest.fixture(scope="module")
def venv_results(tmp_path_factory):
    if not VENV_PY.exists():
        pytest.skip(".venv-rl is absent: run scripts/setup_rl_env.sh to create the veRL environment")
    cwd = tmp_path_factory.mktemp("verl_checks")  # not the repository: workers must import it via runtime_env
    return _run_venv(VENV_CHECKS, str(ROOT), json.dumps(_rows()), json.dumps(launch_overrides()), cwd=cwd)


def test_launch_config_passes_verl_validation_and_is_prepared_for_adrpo(venv_results):
    compose = venv_results["compose"]
    assert compose["settings"] == [True, None]
    assert compose["off"] == [False, None]
    assert compose["alpha8"] == [True, 8.0]
    assert compose["trainer_mode"] == "adrpo_sync"
    # the KL loss needs the reference policy; GRPO-style estimators need no critic
    assert compose["need_ref"] is True and compose["need_critic"] is False
    env_vars = compose["env_vars"]
    assert env_vars["PYTHONPATH"].split(os.pathsep)[:2] == [str(ROOT), "/other"]
    assert env_vars["REWARD_CONFIG"] == "/cfg/reward.json"
    assert "REWARD_SERVER_TOKEN" not in env_vars  # secrets stay out of the job's runtime_env
    assert "use_v1" in compose["errors"]["legacy"]
    assert "adrpo_sync" in compose["errors"]["async"]


def test_verl_dispatches_adrpo_to_our_estimator(venv_results):
    rows = _rows()
    assert venv_results["registered_fn_is_ours"] is True
    # veRL's compute_advantage passes registered estimators no per-sample extras: it yields the GRPO part
    assert venv_results["verl_own"] == pytest.approx(_hand(rows, weighted=False), rel=1e-5, abs=1e-6)
    assert venv_results["verl_own_masked_ok"] is True
    # on groups of several distinct rewards the GRPO part is veRL's own grpo estimator. Not compared: the
    # group of one (veRL keeps r / 1, we give 0) and the all-tied group (veRL's float32 statistics leave a
    # ~1e-8 residue that its 1e-6 epsilon turns into |A| ~ 0.03; ours are float64, so ties give ~0)
    grpo = venv_results["verl_grpo"]
    for i, row in enumerate(rows):
        if row["uid"] not in ("s2-core", "s1-procedural"):
            assert venv_results["verl_own"][i] == pytest.approx(grpo[i], rel=1e-5, abs=1e-6)
    assert grpo[-1] != 0.0 and venv_results["verl_own"][-1] == 0.0


def test_trainer_path_applies_alpha_to_the_dominant_agents_samples_only(venv_results):
    rows = _rows()
    expected = _hand(rows)
    got = venv_results["trainer_path"]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert venv_results["direct"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert venv_results["trainer_path_masked_ok"] is True
    plain = _hand(rows, weighted=False)
    for i, row in enumerate(rows):
        agent = row["uid"].split("-", 1)[1]
        k = i % 8
        boosted = k in BOOSTED.get(agent, set()) and row["uid"].startswith("s1")
        if agent == "core" or not boosted:
            assert got[i] == pytest.approx(plain[i], rel=1e-5, abs=1e-6)
        else:
            assert got[i] == pytest.approx(ALPHA * plain[i], rel=1e-5, abs=1e-6)
    assert all(abs(got[i]) < 1e-9 for i, r in enumerate(rows) if r["uid"] == "s1-procedural")  # ties


def test_attribution_off_is_plain_grpo_and_alpha_8_replaces_the_reward_alpha(venv_results):
    rows = _rows()
    assert venv_results["attribution_off"] == pytest.approx(_hand(rows, weighted=False), rel=1e-5, abs=1e-6)
    assert venv_results["alpha8"] == pytest.approx(_hand(rows, alpha=8.0), rel=1e-5, abs=1e-6)


def test_v1_trainer_reads_the_weight_from_the_reward_extra_info_in_transferqueue(venv_results):
    rows = _rows()
    expected = _hand(rows)
    got = venv_results["v1_tq"]
    assert [len(row) for row in got] == [r["length"] for r in rows]
    for values, want in zip(got, expected):
        assert values == pytest.approx([want] * len(values), rel=1e-5, abs=1e-6)
    assert venv_results["v1_tq_returns_equal"] is True
    boosted = sum(1 for r in rows if r["weight"] not in (None, 1.0))
    assert venv_results["v1_metrics"]["adrpo/boosted_fraction"] == pytest.approx(boosted / len(rows))


def test_trainer_mode_selects_our_trainer_which_runs_as_verls_sync_trainer(venv_results):
    assert venv_results["v1_trainer"] == {
        "class": "ADRPOTrainer",
        "mode": "sync",
        "config_mode": "sync",
        "replay_buffer": "ReplayBuffer",  # the sync buffer, not ReplayBufferAsync
    }


def test_taskrunner_worker_process_has_both_registrations(venv_results):
    status = venv_results["taskrunner"]
    assert status["estimator"] is True and status["trainer"] is True
    assert status["pid"] != venv_results["driver_pid"]


# --------------------------------------------------------------------------- checkpoint conversion

MAKE_CHECKPOINT = r"""
import json, os, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
actor = os.path.join(sys.argv[1], "global_step_3", "actor")
os.makedirs(os.path.join(actor, "huggingface"))
cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
                  architectures=["Qwen2ForCausalLM"])
model = AutoModelForCausalLM.from_config(cfg)
cfg.save_pretrained(os.path.join(actor, "huggingface"))
# the layout veRL's FSDP checkpoint manager writes, with one shard (world size 1)
torch.save(model.state_dict(), os.path.join(actor, "model_world_size_1_rank_0.pt"))
json.dump({"world_size": 1}, open(os.path.join(actor, "fsdp_config.json"), "w"))
torch.save(model.state_dict(), os.path.join(sys.argv[1], "reference.pt"))
json.dump({}, open("result.json", "w"))
"""


@needs_venv
def test_convert_script_merges_a_veRL_fsdp_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _run_venv(MAKE_CHECKPOINT, str(tmp_path / "ckpt"), cwd=tmp_path)
    target = tmp_path / "hf"
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "convert_verl_to_hf.sh"),
            str(tmp_path / "ckpt" / "global_step_3"),
            str(target),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (target / "config.json").exists()
    merged = safetensors_torch.load_file(str(target / "model.safetensors"))
    reference = torch.load(tmp_path / "ckpt" / "reference.pt")
    assert set(merged) == set(reference)
    for name, tensor in reference.items():  # the merger writes bfloat16, the dtype veRL trains and serves in
        assert torch.equal(merged[name], tensor.to(merged[name].dtype)), name


def test_convert_script_rejects_a_folder_that_is_no_checkpoint(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "convert_verl_to_hf.sh"), str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "fsdp_config.json" in proc.stderr
