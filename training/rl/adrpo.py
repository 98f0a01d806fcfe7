"""ADRPO on veRL 0.9.1: GRPO advantages scaled by an attribution weight.

Run it as ``python -m training.rl.adrpo <hydra overrides...>`` from ``.venv-rl`` (see
``scripts/run_memory_grpo_multinode.sh``). The pure maths (:func:`compute_adrpo_advantage`,
:func:`attribution_multipliers`) needs only numpy and torch; everything that touches veRL is defined
only when veRL is importable, so the main environment's unit tests can import this module.

What ADRPO adds to GRPO (PAPER §5): every prompt is one (session, agent) pair sampled n = 8 times; a
sample's advantage is its reward normalised over those 8 samples, ``A = (r - mean) / (std + eps)``,
then multiplied by the sample's attribution weight. The reward function (``training/reward_server/
reward_function.py``) decides the weight, because only it sees the joint rollout's retrieval counts:
``attribution_weight = alpha`` (4 by default) on the sample of the agent whose memory type dominated
retrieval, 1.0 on every other sample, never alpha on core. It returns the weight in its result dict
(``{"score": r, "attribution_weight": w, ...}``).

Why the V1 trainer (``trainer.use_v1=True``)
-------------------------------------------
In 0.9.1 the V1 trainer is the default (``trainer.use_v1: true`` in ``ppo_trainer.yaml``) and the
legacy ``RayPPOTrainer`` is marked deprecated ("will be removed"). V1 also gives us the two extension
points we need without touching veRL globally: a trainer registry (``register_trainer`` /
``get_trainer_cls(config.trainer.v1.trainer_mode)``) and a ``task_runner_class`` argument to
``verl.trainer.main_ppo.run_ppo``. The legacy trainer calls ``compute_advantage`` from inside its
~400-line ``fit``, so carrying the weight there would mean overriding all of ``fit``.

Where the weight travels (verified in the 0.9.1 source)
-------------------------------------------------------
1. veRL's reward loop (``NaiveRewardManager.run_single``) calls ``compute_score`` once per sample and
   copies every key of a dict result into ``reward_extra_info``.
2. The agent loop stores that under the sample's ``extra_fields["reward_extra_info"]`` in the
   TransferQueue (the legacy trainer instead puts each key into ``batch.non_tensor_batch``).
3. ``PPOTrainer._compute_advantage`` fetches only ``uid, response_mask, rm_scores, ...`` from the
   TransferQueue, and ``ray_trainer.compute_advantage`` calls a registered estimator with
   ``token_level_rewards, response_mask, config, index`` only (``non_tensor_batch`` is passed to GDPO
   alone). So the weight never reaches the estimator through veRL's own call.
4. Our smallest wrapper: :class:`ADRPOTrainer` subclasses veRL's sync trainer and overrides only
   ``_compute_advantage``: it lets veRL compute the advantage as usual (veRL's ``compute_advantage``
   dispatches to our registered ``"adrpo"`` estimator, which gives the group-normalised part), then
   reads ``attribution_weight`` from the same samples' ``extra_fields`` and scales ``advantages`` and
   ``returns`` row by row (:func:`apply_attribution_weights`). Because the weight is one number per
   sample and the GRPO advantage is one number broadcast over the response mask, scaling afterwards
   equals scaling inside the estimator. For code that holds a ``DataProto`` (tests, the legacy layout)
   :func:`compute_advantage` is the same two steps: veRL's ``compute_advantage`` then the weights
   from ``non_tensor_batch["attribution_weight"]``.

   veRL branches on ``trainer_mode == "sync"`` in several places, so the class is registered as
   ``"adrpo_sync"`` (to be selectable) and resets ``config.trainer.v1.trainer_mode`` to ``"sync"`` in
   its constructor, after veRL has picked the class: inside veRL it then behaves as the sync trainer.

Where advantages are computed, and how the registration gets there
------------------------------------------------------------------
``run_ppo`` starts a TaskRunner Ray actor; the trainer lives in that actor's process and is the only
caller of ``get_adv_estimator_fn`` (FSDP actor workers only consume ``advantages``; vLLM, reward and
agent-loop workers never see them). A registration done in the driver is therefore not enough. Our
entry point hands ``run_ppo`` its own TaskRunner, :data:`ADRPOTaskRunner`, a subclass of veRL's
``TaskRunnerV1`` defined at the top level of this module. Ray pickles such a class by reference, so the
TaskRunner process imports ``training.rl.adrpo`` before it runs, and that import registers both the
``"adrpo"`` estimator (``register_adv_est``) and the ``"adrpo_sync"`` trainer (``register_trainer``).
``ADRPOTaskRunner.run`` checks both registrations before training starts. To make the import work on
every node, the entry point adds the repository root to ``PYTHONPATH`` in the job's Ray runtime
environment (``ray_kwargs.ray_init.runtime_env.env_vars``). We do not use Ray's
``worker_process_setup_hook``: it would import the trainer stack into every vLLM, FSDP, reward and
agent-loop worker, none of which computes advantages.

Ablation switches
-----------------
``algorithm.adrpo.enable_attribution`` (default true; false gives plain GRPO) and
``algorithm.adrpo.attribution_boost_factor`` (default unset: use the weight the reward function
returned; set it, e.g. 8.0, to give every boosted sample that factor instead). Set them as Hydra
overrides (``+algorithm.adrpo.enable_attribution=False``) or through the environment
(``ADRPO_ENABLE_ATTRIBUTION=0``, ``ADRPO_ATTRIBUTION_BOOST_FACTOR=8``); an override beats the
environment. The reward config (``REWARD_CONFIG``) has its own ``enable_attribution_weighting`` and
``attribution_boost_factor``, which decide the weight the reward returns; either side gives the
ablation. The length-penalty and sparse-reward ablations are reward-side only.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

try:  # the main environment's unit tests import this module with or without torch
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ESTIMATOR_NAME = "adrpo"
TRAINER_MODE = "adrpo_sync"
WEIGHT_KEY = "attribution_weight"
DEFAULT_EPSILON = 1e-6
REPO_ROOT = Path(__file__).resolve().parents[2]
# Settings the reward function reads inside Ray's reward workers; forwarded to every worker of the job.
# (Secrets such as REWARD_SERVER_TOKEN are not put into the job's runtime_env, which Ray shows on its
# dashboard: workers inherit them from the raylet, i.e. from the shell that ran `ray start`.)
FORWARDED_ENV = ("REWARD_SERVER_URL", "REWARD_CONFIG", "MEMBUILDER_REWARD_CONFIG")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ADRPOConfigError(ValueError):
    """A user error in the ADRPO settings (reported in one line, exit code 2)."""


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ADRPOSettings:
    """The trainer-side ADRPO switches.

    ``attribution_boost_factor`` None means: trust the weight the reward function returned.
    """

    enable_attribution: bool = True
    attribution_boost_factor: float | None = None

    @classmethod
    def resolve(cls, algo_config: Any = None, env: Mapping[str, str] | None = None) -> ADRPOSettings:
        """Read ``algorithm.adrpo.*`` from a veRL algorithm config, falling back to ``ADRPO_*`` env."""
        env = os.environ if env is None else env
        block = _get(algo_config, "adrpo", None) or {}
        enable = _get(block, "enable_attribution", None)
        if enable is None:
            enable = env.get("ADRPO_ENABLE_ATTRIBUTION")
        factor = _get(block, "attribution_boost_factor", None)
        if factor is None:
            factor = env.get("ADRPO_ATTRIBUTION_BOOST_FACTOR") or None
        return cls(
            enable_attribution=True if enable is None else _as_bool(enable, "enable_attribution"),
            attribution_boost_factor=None if factor is None else _as_factor(factor),
        )


def _get(obj: Any, key: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    getter = getattr(obj, "get", None)  # DictConfig and veRL's BaseConfig both offer .get
    if callable(getter):
        return getter(key, default)
    return getattr(obj, key, default)


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ADRPOConfigError(f"adrpo.{name} must be a boolean, got {value!r}")


def _as_factor(value: Any) -> float:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ADRPOConfigError(f"adrpo.attribution_boost_factor must be a number, got {value!r}") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ADRPOConfigError(f"adrpo.attribution_boost_factor must be finite and > 0, got {value!r}")
    return factor


# --------------------------------------------------------------------------------------------------
# the maths (numpy + torch only)
# --------------------------------------------------------------------------------------------------


def _weights_as_floats(weights: Any, batch_size: int) -> np.ndarray:
    """Per-sample weights as float64; a missing weight (None, NaN, absent array) counts as 1.0."""
    if weights is None:
        return np.ones(batch_size, dtype=np.float64)
    if torch is not None and isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    items = list(np.asarray(weights, dtype=object).reshape(-1))
    if len(items) != batch_size:
        raise ValueError(f"{WEIGHT_KEY} has {len(items)} entries for a batch of {batch_size}")
    out = np.ones(batch_size, dtype=np.float64)
    for i, item in enumerate(items):
        if item is None:
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{WEIGHT_KEY}[{i}] is not a number: {item!r}") from None
        if math.isnan(value):
            continue
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{WEIGHT_KEY}[{i}] must be finite and > 0, got {item!r}")
        out[i] = value
    return out


def attribution_multipliers(weights: Any, batch_size: int, settings: ADRPOSettings | None = None) -> np.ndarray:
    """The factor each sample's advantage is multiplied by.

    With attribution off every factor is 1 (plain GRPO). With ``attribution_boost_factor`` set, every
    sample the reward function boosted (weight != 1) gets that factor instead of the returned weight.
    """
    settings = settings or ADRPOSettings()
    if not settings.enable_attribution:
        return np.ones(batch_size, dtype=np.float64)
    weights = _weights_as_floats(weights, batch_size)
    if settings.attribution_boost_factor is not None:
        weights = np.where(weights != 1.0, settings.attribution_boost_factor, 1.0)
    return weights


def _group_ids(index: Any) -> np.ndarray:
    """Dense group ids in order of first appearance (uids are arbitrary hashables)."""
    seen: dict[Any, int] = {}
    return np.array([seen.setdefault(_hashable(u), len(seen)) for u in index], dtype=np.int64)


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, np.generic):
        return value.item()
    return value


def compute_adrpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    attribution_weight: Any = None,
    epsilon: float = DEFAULT_EPSILON,
    norm_adv_by_std: bool | None = None,
    config: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage over the samples sharing an ``index`` (prompt uid), times the weight.

    Args:
        token_level_rewards: (bs, response_len); a sample's score is the sum over its tokens.
        response_mask: (bs, response_len); the advantage is broadcast over it.
        index: (bs,) group key of each sample, veRL's ``uid``.
        attribution_weight: (bs,) weights, None entries/NaN meaning 1.0; None means all 1.0. veRL's
            own ``compute_advantage`` never passes it (extra keyword arguments are ignored), which is
            why :func:`compute_advantage` / :class:`ADRPOTrainer` apply the weights afterwards.
        epsilon: added to the group std.
        norm_adv_by_std: divide by the group std; None takes ``config.norm_adv_by_std_in_grpo``
            (veRL passes ``config`` but not this flag to registered estimators), else True.
        config: veRL's ``algorithm`` config; ``config.adrpo`` holds the ablation switches.

    The std is the unbiased one (``torch.std``), as in veRL's GRPO, so with all weights 1 this equals
    veRL's ``grpo`` estimator, except that a group of one sample gets advantage 0 (veRL's keeps r / 1)
    and that a group of equal rewards gets ~0 (veRL's float32 statistics leave a residue that its
    epsilon turns into |A| of a few hundredths; the statistics here are float64).

    Returns:
        (advantages, returns), both (bs, response_len), identical as for every outcome estimator.
    """
    if torch is None:  # pragma: no cover
        raise ImportError("compute_adrpo_advantage needs torch")
    if norm_adv_by_std is None:
        norm_adv_by_std = bool(_get(config, "norm_adv_by_std_in_grpo", True))

    with torch.no_grad():
        # float64 for the group statistics: float32 sums of equal rewards drift by ~1e-8, which the
        # 1e-6 epsilon would blow up into a visible advantage for a group of ties.
        scores = token_level_rewards.sum(dim=-1).to(torch.float64)
        batch_size = scores.shape[0]
        if len(index) != batch_size:
            raise ValueError(f"index has {len(index)} entries for a batch of {batch_size}")
        groups = torch.as_tensor(_group_ids(index), device=scores.device)
        n_groups = int(groups.max().item()) + 1 if batch_size else 0

        counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
            0, groups, torch.ones_like(scores)
        )
        means = torch.zeros_like(counts).index_add_(0, groups, scores) / counts
        centred = scores - means[groups]
        sq_dev = torch.zeros_like(counts).index_add_(0, groups, centred * centred)
        stds = torch.sqrt(sq_dev / (counts - 1).clamp(min=1))
        advantage = centred / (stds[groups] + epsilon) if norm_adv_by_std else centred
        advantage = torch.where(counts[groups] > 1, advantage, torch.zeros_like(advantage))

        multipliers = attribution_multipliers(attribution_weight, batch_size, ADRPOSettings.resolve(config))
        advantage = advantage * torch.as_tensor(multipliers, dtype=advantage.dtype, device=advantage.device)
        advantages = advantage.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def _scale_rows(tensor: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Multiply row i of a padded (bs, L) or jagged nested tensor by ``factors[i]``."""
    if tensor.is_nested:
        rows = [row * factors[i].to(row.dtype) for i, row in enumerate(tensor.unbind())]
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    return tensor * factors.to(device=tensor.device, dtype=tensor.dtype).unsqueeze(-1)


def weights_from_extra_fields(extra_fields: Iterable[Any]) -> list[Any]:
    """``reward_extra_info[WEIGHT_KEY]`` of each sample as the V1 agent loop stores it (None if absent)."""
    out = []
    for item in extra_fields:
        info = item.get("reward_extra_info") if isinstance(item, Mapping) else None
        out.append(info.get(WEIGHT_KEY) if isinstance(info, Mapping) else None)
    return out


def _is_adrpo(adv_estimator: Any) -> bool:
    return str(getattr(adv_estimator, "value", adv_estimator)) == ESTIMATOR_NAME


def _multiplier_metrics(factors: np.ndarray) -> dict[str, float]:
    if factors.size == 0:
        return {}
    return {
        "adrpo/boosted_fraction": float(np.mean(factors != 1.0)),
        "adrpo/mean_multiplier": float(np.mean(factors)),
    }


# --------------------------------------------------------------------------------------------------
# veRL glue: defined only where veRL is installed (.venv-rl)
# --------------------------------------------------------------------------------------------------

HAVE_VERL = find_spec("verl") is not None and torch is not None


def apply_attribution_weights(data: Any, config: Any = None, metrics: dict | None = None) -> Any:
    """Scale ``data.batch["advantages"]``/``["returns"]`` by ``non_tensor_batch["attribution_weight"]``.

    ``data`` is a veRL ``DataProto`` whose advantages were computed by the ``"adrpo"`` estimator.
    """
    batch_size = len(data)
    factors = attribution_multipliers(data.non_tensor_batch.get(WEIGHT_KEY), batch_size, ADRPOSettings.resolve(config))
    scale = torch.as_tensor(factors)
    for key in ("advantages", "returns"):
        if key in data.batch.keys():
            data.batch[key] = _scale_rows(data.batch[key], scale)
    if metrics is not None:
        metrics.update(_multiplier_metrics(factors))
    return data


def compute_advantage(
    data: Any,
    adv_estimator: Any,
    gamma: float = 1.0,
    lam: float = 1.0,
    num_repeat: int = 1,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> Any:
    """veRL's ``ray_trainer.compute_advantage`` (same signature), then the attribution weights for adrpo."""
    from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

    data = verl_compute_advantage(
        data,
        adv_estimator=adv_estimator,
        gamma=gamma,
        lam=lam,
        num_repeat=num_repeat,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        config=config,
    )
    if _is_adrpo(adv_estimator):
        data = apply_attribution_weights(data, config)
    return data


def register_estimator() -> None:
    """Register :func:`compute_adrpo_advantage` with veRL as ``"adrpo"`` (idempotent)."""
    from verl.trainer.ppo import core_algos

    try:
        if core_algos.get_adv_estimator_fn(ESTIMATOR_NAME) is compute_adrpo_advantage:
            return
    except ValueError:
        pass
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_adrpo_advantage)


def registration_status() -> dict[str, Any]:
    """What this process has registered with veRL (used by the TaskRunner check and the tests)."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.v1 import get_trainer_cls

    try:
        estimator_ok = core_algos.get_adv_estimator_fn(ESTIMATOR_NAME) is compute_adrpo_advantage
    except ValueError:
        estimator_ok = False
    try:
        trainer_ok = get_trainer_cls(TRAINER_MODE) is ADRPOTrainer
    except ValueError:
        trainer_ok = False
    return {"estimator": estimator_ok, "trainer": trainer_ok, "pid": os.getpid()}


def build_runtime_env_additions(env: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Ray runtime_env entries our job needs on every node.

    PYTHONPATH puts the repository first so that Ray can import ``training.rl.adrpo`` (our TaskRunner)
    and the reward function can import the project's modules; the :data:`FORWARDED_ENV` settings
    reach the reward workers even on nodes whose raylet was not started from the launching shell.
    """
    env = os.environ if env is None else env
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    env_vars = {"PYTHONPATH": os.pathsep.join(paths)}
    env_vars.update({k: env[k] for k in FORWARDED_ENV if env.get(k)})
    return {"env_vars": env_vars}


def prepare_config(config: Any, env: Mapping[str, str] | None = None) -> ADRPOSettings:
    """Check and complete a composed veRL config for an ADRPO run (in place).

    Fills ``algorithm.adrpo`` from the environment where an override did not set it, selects the
    ADRPO trainer, and adds our runtime_env entries. Raises ADRPOConfigError on a user error.
    """
    from omegaconf import open_dict

    settings = ADRPOSettings.resolve(config.algorithm, env)
    adrpo = _is_adrpo(config.algorithm.adv_estimator)
    if adrpo and not config.trainer.get("use_v1", True):
        raise ADRPOConfigError("algorithm.adv_estimator=adrpo needs the V1 trainer: set trainer.use_v1=True")
    mode = config.trainer.v1.trainer_mode
    if adrpo and mode not in ("sync", TRAINER_MODE):
        raise ADRPOConfigError(
            f"trainer.v1.trainer_mode={mode} is not supported with adrpo: use {TRAINER_MODE} (on-policy, one "
            "update per batch)"
        )
    with open_dict(config):
        if adrpo:
            config.trainer.v1.trainer_mode = TRAINER_MODE
        config.algorithm.adrpo = {
            "enable_attribution": settings.enable_attribution,
            "attribution_boost_factor": settings.attribution_boost_factor,
        }
        runtime_env = config.ray_kwargs.ray_init.get("runtime_env") or {}
        additions = build_runtime_env_additions(env)
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.update(additions["env_vars"])
        config.ray_kwargs.ray_init.runtime_env = {**runtime_env, "env_vars": env_vars}
    return settings


def compose_config(overrides: list[str]) -> Any:
    """veRL's ``ppo_trainer`` config composed with ``overrides``, exactly as our entry point sees it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


if HAVE_VERL and __name__ != "__main__":
    # Under ``python -m`` this file runs once as __main__ and is then imported as training.rl.adrpo
    # (see the bottom); only the imported module defines and registers, or veRL's registries would
    # see two different objects under one name.
    import ray
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer
    from verl.workers.utils.padding import response_to_nested

    register_estimator()

    @register_trainer(TRAINER_MODE)
    class ADRPOTrainer(PPOTrainerSync):
        """veRL's sync V1 trainer; advantages get the attribution weight from the reward's extra info."""

        def __init__(self, config: Any):
            # veRL selected this class by name; inside veRL it must behave exactly as the sync trainer.
            config.trainer.v1.trainer_mode = "sync"
            super().__init__(config)

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            batch = super()._compute_advantage(batch, metrics=metrics)
            if _is_adrpo(self.config.algorithm.adv_estimator):
                self._apply_attribution(batch, metrics)
            return batch

        def _apply_attribution(self, batch: Any, metrics: dict) -> None:
            fields = tq.kv_batch_get(
                keys=batch.keys,
                partition_id=batch.partition_id,
                select_fields=["advantages", "returns", "response_mask", "extra_fields"],
            )
            extra = fields["extra_fields"]
            weights = weights_from_extra_fields(extra.tolist() if hasattr(extra, "tolist") else list(extra))
            response_mask = fields["response_mask"]
            data = DataProto.from_dict(
                tensors={
                    "advantages": fields["advantages"].to_padded_tensor(0.0),
                    "returns": fields["returns"].to_padded_tensor(0.0),
                },
                non_tensors={WEIGHT_KEY: np.array(weights, dtype=object)},
            )
            data = apply_attribution_weights(data, self.config.algorithm, metrics)
            output = TensorDict(
                {key: response_to_nested(data.batch[key], response_mask) for key in ("advantages", "returns")},
                batch_size=len(batch),
            )
            tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

    class ADRPOTaskRunnerImpl(TaskRunnerV1.__ray_actor_class__):
        """veRL's V1 TaskRunner; living in this module makes Ray import it (and so register) first."""

        def run(self, config: Any) -> Any:
            status = registration_status()
            if not (status["estimator"] and status["trainer"]):
                raise RuntimeError(f"ADRPO is not registered in the TaskRunner process: {status}")
            return super().run(config)

        def adrpo_registration(self) -> dict[str, Any]:
            return registration_status()

    ADRPOTaskRunner = ray.remote(ADRPOTaskRunnerImpl)


def _run(config: Any) -> None:
    """The body of ``main`` once Hydra has composed the config."""
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    settings = prepare_config(config)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    logger.info("ADRPO: estimator=%s %s", config.algorithm.adv_estimator, settings)
    run_ppo(config, task_runner_class=ADRPOTaskRunner)


def main() -> None:
    """``python -m training.rl.adrpo <hydra overrides>``: veRL's PPO trainer with ADRPO wired in.

    The same command line as ``python -m verl.trainer.main_ppo`` (Hydra's ``--cfg job`` prints the
    composed config without running).
    """
    if not HAVE_VERL:
        sys.exit("training.rl.adrpo: veRL is not installed here; run it with .venv-rl/bin/python")
    import hydra

    @hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
    def _entry(config: Any) -> None:
        try:
            _run(config)
        except ADRPOConfigError as exc:
            print(f"training.rl.adrpo: {exc}", file=sys.stderr)
            sys.exit(2)

    _entry()


if __name__ == "__main__":
    from training.rl import adrpo as _module  # the importable module, so Ray pickles its classes by name

    _module.main()
