"""MemBuilder's ADRPO reward for veRL 0.9.1: one call scores one agent's sample of one session.

Configure it under `reward.custom_reward_function` (veRL 0.9.1's `main_ppo` reads only that key; the old top-level
`custom_reward_function` is migrated by the fully-async entry point alone):

    reward.custom_reward_function.path=training/reward_server/reward_function.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.config_path=training/reward_server/reward_config.json  (optional)

`compute_score` is a coroutine, so veRL's reward loop awaits it directly: every sample of a batch is in flight at
once. For each sample it

1. applies the validity gate: the output through `parse_actions` (valid = 1, or 0 with the reason);
2. gets the task reward of the sample's joint rollout (the four agents' samples of the same session, joined one to
   one by `JointRendezvous`; an agent that never arrives is filled with the expert's output after a timeout):
   from the reward server (`task_reward_mode: api`, `POST /joint_rollout`) or in this process through the same
   engine (`local`);
3. computes the length penalty P against the expert (PAPER §5) and the reward r = valid * R_task * (1 - lambda P);
4. sets the attribution weight: alpha for the sample of the agent whose memory type dominated retrieval over the
   joint rollout's QAs (core never), 1.0 otherwise.

It returns a dict of scalars and strings (veRL 0.9.1 keeps each key per sample in `non_tensor_batch`, so every call
returns the same keys); `attribution_weight` is what the ADRPO advantage reads.
"""
# No `from __future__ import annotations` here: veRL executes this file by path without registering it in
# sys.modules, and dataclasses cannot resolve string annotations of a module that is not registered.
import asyncio
import json
import logging
import math
import os
import re
import sys
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # veRL loads this file by path, in Ray workers whose sys.path lacks the repository
    sys.path.insert(0, str(_REPO))

from memory_system import AGENTS, Action, ActionFormatError, parse_actions  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path(__file__).with_name("reward_config.json")
CONFIG_ENV = "MEMBUILDER_REWARD_CONFIG"
NO_TYPE = "none"  # dominant_type when nothing was retrieved (veRL stores strings; None would mix types)


LOCAL_WORKERS_ERROR = ("task_reward_mode 'local' needs reward.num_workers=1 (got {n}): veRL spreads a session's four "
                       "agents over its reward workers, and each worker's in-process rendezvous would only see some "
                       "of them; use task_reward_mode 'api' with the reward server instead")


class RewardServerError(RuntimeError):
    """The reward server refused a sample (bad path, bad token, malformed request) or stayed unreachable."""


# --------------------------------------------------------------------------- configuration

@dataclass
class RewardConfig:
    task_reward_mode: str = "api"  # api | local
    memory_api_url: str = "http://127.0.0.1:8765"
    memory_api_token_env: str = "REWARD_SERVER_TOKEN"
    # Length penalty (PAPER §5), lengths in tokens (estimated as chars / 4 on both sides).
    enable_expert_length_penalty: bool = True
    expert_length_penalty_weight: float = 0.8  # lambda
    core_length_start_penalty: float = 150  # theta_min
    core_length_max_penalty: float = 400  # theta_max
    other_length_upper_tolerance: float = 1.3  # gamma_u
    other_length_upper_max_ratio: float = 2.0
    other_length_lower_tolerance: float = 0.5  # gamma_l
    other_length_lower_min_ratio: float = 0.2
    other_length_min_diff_tokens: float = 200
    # Attribution (ADRPO).
    enable_attribution_weighting: bool = True
    attribution_boost_factor: float = 4.0  # alpha
    # Sparse-reward ablation: a seeded fraction of joint rollouts get a constant task reward and no attribution.
    sparse_reward_enabled: bool = False
    sparse_reward_drop_rate: float = 0.5
    sparse_reward_seed: int = 42
    sparse_default_reward: float = 1.0
    # Joint rollouts and transport.
    rendezvous_timeout_s: float = 600.0
    api_timeout_s: float | None = None  # per HTTP call; default rendezvous_timeout_s + 900
    api_max_retries: int = 6
    api_retry_backoff_s: float = 2.0
    # `local` mode: EngineSettings fields (provider, model, judge_model, base_url, state_root, max_in_flight, ...).
    local: dict = field(default_factory=dict)
    # veRL's reward.num_workers, for the local-mode check: pass
    # +reward.custom_reward_function.reward_kwargs.reward_num_workers=${reward.num_workers}
    reward_num_workers: int | None = None

    def __post_init__(self) -> None:
        if self.task_reward_mode not in ("api", "local"):
            raise ValueError(f"task_reward_mode must be 'api' or 'local', not {self.task_reward_mode!r}")
        for name, lo, hi in (("sparse_default_reward", 0.0, 1.0), ("sparse_reward_drop_rate", 0.0, 1.0),
                             ("expert_length_penalty_weight", 0.0, 1.0), ("attribution_boost_factor", 0.0, 1e6),
                             ("rendezvous_timeout_s", 0.0, 86400.0), ("api_retry_backoff_s", 0.0, 3600.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number within [{lo:g}, {hi:g}], not {v!r}")
        if self.api_timeout_s is not None and (isinstance(self.api_timeout_s, bool) or
                                               not isinstance(self.api_timeout_s, (int, float)) or
                                               not math.isfinite(self.api_timeout_s) or self.api_timeout_s <= 0):
            raise ValueError(f"api_timeout_s must be a positive number or null, not {self.api_timeout_s!r}")
        if isinstance(self.api_max_retries, bool) or not isinstance(self.api_max_retries, int) or \
                not 0 <= self.api_max_retries <= 100:
            raise ValueError(f"api_max_retries must be an integer within [0, 100], not {self.api_max_retries!r}")
        if self.task_reward_mode == "local" and self.reward_num_workers is not None and \
                int(self.reward_num_workers) > 1:
            raise ValueError(LOCAL_WORKERS_ERROR.format(n=self.reward_num_workers))
        if not self.core_length_start_penalty < self.core_length_max_penalty:
            raise ValueError("core_length_start_penalty must be below core_length_max_penalty")
        if not (self.other_length_lower_min_ratio < self.other_length_lower_tolerance
                <= self.other_length_upper_tolerance < self.other_length_upper_max_ratio):
            raise ValueError("length ratios must satisfy lower_min < lower_tol <= upper_tol < upper_max")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewardConfig":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document the file
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown reward config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> "RewardConfig":
        path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        for k, v in (overrides or {}).items():
            if k in known:
                data[k] = dict(data.get("local") or {}, **v) if k == "local" and isinstance(v, Mapping) else v
        return cls.from_dict(data)

    def sparse_options(self) -> dict | None:
        if not self.sparse_reward_enabled:
            return None
        return {"drop_rate": self.sparse_reward_drop_rate, "seed": self.sparse_reward_seed,
                "default_reward": self.sparse_default_reward}


_CONFIGS: dict[str, RewardConfig] = {}


def _config_from_kwargs(kwargs: Mapping[str, Any]) -> RewardConfig:
    """The config file (reward_kwargs `config_path`, else $MEMBUILDER_REWARD_CONFIG, else the default) with any
    reward_kwargs that name a config key laid over it."""
    known = {f.name for f in fields(RewardConfig)}
    overrides = {k: _plain(v) for k, v in kwargs.items() if k in known}
    path = kwargs.get("config_path")
    key = json.dumps([str(path), overrides], sort_keys=True, default=str)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = _CONFIGS[key] = RewardConfig.load(path, overrides)
    return cfg


# --------------------------------------------------------------------------- the reward, pure

def estimate_tokens(text: str) -> float:
    """Tokens as characters / 4 (PAPER §5 accepts the estimate if both sides use it)."""
    return len(text or "") / 4.0


def written_tokens(actions: Sequence[Action]) -> float:
    return sum(estimate_tokens(a.written_text()) for a in actions)


def core_length_penalty(tokens: float, start: float = 150, full: float = 400) -> float:
    """P for the core agent: 0 up to `start` tokens, linear to 1 at `full`, 1 beyond."""
    if tokens <= start:
        return 0.0
    if tokens >= full:
        return 1.0
    return (tokens - start) / (full - start)


def other_length_penalty(policy_tokens: float, expert_tokens: float, *, lower: float = 0.5, upper: float = 1.3,
                         lower_min: float = 0.2, upper_max: float = 2.0, min_diff: float = 200) -> float:
    """P for an entry agent from rho = L_policy / L_expert (the total length each writes for the session)."""
    if expert_tokens <= 0 or abs(policy_tokens - expert_tokens) < min_diff:
        return 0.0
    rho = policy_tokens / expert_tokens
    if lower <= rho <= upper:
        return 0.0
    if rho > upper:
        return min(1.0, (rho - upper) / (upper_max - upper))
    return min(1.0, (lower - rho) / (lower - lower_min))


def length_penalty(agent: str, policy_actions: Sequence[Action], expert_actions: Sequence[Action],
                   cfg: RewardConfig) -> float:
    if not cfg.enable_expert_length_penalty:
        return 0.0
    if agent == "core":
        return core_length_penalty(written_tokens(policy_actions[:1]), cfg.core_length_start_penalty,
                                   cfg.core_length_max_penalty)
    return other_length_penalty(written_tokens(policy_actions), written_tokens(expert_actions),
                                lower=cfg.other_length_lower_tolerance, upper=cfg.other_length_upper_tolerance,
                                lower_min=cfg.other_length_lower_min_ratio, upper_max=cfg.other_length_upper_max_ratio,
                                min_diff=cfg.other_length_min_diff_tokens)


def agent_reward(valid: bool, task_reward: float, penalty: float, weight: float = 0.8) -> float:
    """r = valid * R_task * (1 - lambda * P)."""
    return (1.0 if valid else 0.0) * task_reward * (1.0 - weight * penalty)


def attribution_weight(agent: str, dominant: str | None, *, enabled: bool = True, alpha: float = 4.0,
                       sparse: bool = False) -> float:
    """alpha for the sample of the agent whose type dominated retrieval; core is never boosted."""
    if not enabled or sparse or dominant in (None, NO_TYPE) or agent == "core" or agent != dominant:
        return 1.0
    return float(alpha)


def validity(agent: str, output: Any) -> tuple[bool, list[Action], str]:
    try:
        return True, parse_actions(agent, output if output is not None else ""), ""
    except ActionFormatError as exc:
        return False, [], exc.reason


def expert_actions(agent: str, expert_output: Any) -> list[Action]:
    """The expert's actions for the length reference; an unusable expert output counts as writing nothing."""
    if expert_output is None:
        return []
    ok, acts, reason = validity(agent, expert_output)
    if not ok:
        log.debug("expert output for %s does not parse (%s): no length reference", agent, reason)
    return acts


def score_sample(cfg: RewardConfig, agent: str, output: Any, expert_output: Any, joint: Mapping[str, Any]) -> dict:
    """The per-sample result from the joint rollout's outcome (`JointOutcome.to_dict()` or the server's reply)."""
    valid, acts, reason = validity(agent, output)
    ref = expert_actions(agent, expert_output)
    sparse = bool(joint.get("sparse"))
    task_reward = float(joint.get("task_reward") or 0.0)
    penalty = length_penalty(agent, acts, ref, cfg) if valid else 0.0
    dominant = joint.get("dominant_type") or NO_TYPE
    task = joint.get("task") or {}
    members = joint.get("members") or {}
    return {
        "score": agent_reward(valid, task_reward, penalty, cfg.expert_length_penalty_weight),
        "task_reward": task_reward,
        "length_penalty": penalty,
        "valid": 1.0 if valid else 0.0,
        "dominant_type": dominant,
        "attribution_weight": attribution_weight(agent, dominant, enabled=cfg.enable_attribution_weighting,
                                                 alpha=cfg.attribution_boost_factor, sparse=sparse),
        "sparse": 1.0 if sparse else 0.0,
        "joint_id": str(joint.get("joint_id") or ""),
        "joint_timed_out": 1.0 if joint.get("timed_out") else 0.0,
        "expert_filled": sum(1 for a, m in members.items() if m != "policy" and a != agent),
        "failed_questions": int(task.get("failed_questions") or 0),
        # The task reward is a share of these questions: with none (a row without synthetic QA, or a sparse joint
        # rollout, which is not evaluated) a 0.0 above means "no questions", not "all wrong".
        "n_questions": int(task.get("n_questions", task.get("total", 0)) or 0),
        "policy_tokens": written_tokens(acts[:1] if agent == "core" else acts),
        "expert_tokens": written_tokens(ref[:1] if agent == "core" else ref),
        "invalid_reason": reason,
    }


# --------------------------------------------------------------------------- inputs from veRL

def _plain(v: Any) -> Any:
    """Python values from what a parquet row turns into (numpy arrays and scalars)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a veRL dependency
        np = None
    if np is not None:
        if isinstance(v, np.ndarray):
            return [_plain(x) for x in v.tolist()]
        if isinstance(v, np.generic):
            return v.item()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class SampleInputs:
    agent: str
    session_group_id: str
    state_path: str | None
    qa_pairs: list[dict]
    expert_outputs: dict[str, Any]
    current_time: str | None

    @classmethod
    def from_extra_info(cls, extra_info: Mapping[str, Any] | None) -> "SampleInputs":
        info = _plain(extra_info or {})
        agent = info.get("agent")
        if agent not in AGENTS:
            raise ValueError(f"extra_info.agent must be one of {', '.join(AGENTS)}, got {agent!r}")
        group = info.get("session_group_id")
        if not group:
            raise ValueError("extra_info.session_group_id is missing")
        qa = []
        for q in info.get("qa_pairs") or []:
            if isinstance(q, Mapping) and q.get("question") and q.get("answer") is not None:
                qa.append({"question": str(q["question"]), "answer": str(q["answer"]),
                           "type": q.get("type"), "source": q.get("source")})
        experts = {a: o for a, o in (info.get("expert_outputs") or {}).items() if a in AGENTS and o not in (None, "")}
        current = info.get("current_time") or info.get("session_time") or info.get("question_date")
        return cls(agent, str(group), info.get("state_path") or None, qa, experts,
                   str(current) if current else None)


# --------------------------------------------------------------------------- joint rollout: api and local

_HTTP: dict[int, tuple[asyncio.AbstractEventLoop, Any]] = {}


def _http_client(cfg: RewardConfig):
    import httpx

    loop = asyncio.get_running_loop()
    hit = _HTTP.get(id(loop))
    if hit is None or hit[0] is not loop:
        timeout = cfg.api_timeout_s or (cfg.rendezvous_timeout_s + 900.0)
        # No connection cap: every sample of a batch waits on the server at once, and a capped pool would hold
        # back the partners a waiting sample needs.
        client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0),
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                   trust_env=False)
        for k in [k for k, (lp, _) in _HTTP.items() if lp.is_closed()]:
            del _HTTP[k]
        hit = _HTTP[id(loop)] = (loop, client)
    return hit[1]


async def _close_http_client() -> None:
    hit = _HTTP.pop(id(asyncio.get_running_loop()), None)
    if hit is not None:
        await hit[1].aclose()


def _backoff_s(cfg: RewardConfig, attempt: int) -> float:
    return min(60.0, cfg.api_retry_backoff_s * 2 ** attempt)


async def _joint_via_api(cfg: RewardConfig, body: dict) -> dict:
    """POST /joint_rollout, retried (same sample key, so a retry re-attaches to its joint rollout) on transport
    errors, 429 and answers marked `retryable`; any other refusal raises at once."""
    import httpx

    url = cfg.memory_api_url.rstrip("/") + "/joint_rollout"
    token = os.environ.get(cfg.memory_api_token_env) if cfg.memory_api_token_env else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = _http_client(cfg)
    last = ""
    for attempt in range(cfg.api_max_retries + 1):
        try:
            resp = await client.post(url, json=body, headers=headers)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if resp.status_code == 200:
                return resp.json()
            try:
                doc = resp.json()
            except ValueError:
                doc = {}
            doc = doc if isinstance(doc, dict) else {}
            reason = str(doc.get("reason") or resp.text[:300])
            retryable = doc.get("retryable")
            if retryable is None:  # not our server's JSON (a proxy, a restart): 5xx and 429 may pass
                retryable = resp.status_code >= 500 or resp.status_code == 429
            if not retryable:
                raise RewardServerError(f"reward server refused the sample (HTTP {resp.status_code}): {reason}")
            last = f"HTTP {resp.status_code}: {reason}"
        if attempt < cfg.api_max_retries:
            await asyncio.sleep(_backoff_s(cfg, attempt))
    raise RewardServerError(f"reward server at {url} unreachable after {cfg.api_max_retries + 1} attempts: {last}")


def _reward_worker_index() -> int | None:
    """The index of the veRL reward-loop worker (a Ray actor named reward_loop_worker_<i>) this process is, if any."""
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        name = ray.get_runtime_context().get_actor_name()
    except Exception:  # noqa: BLE001 - not in a Ray actor, or an older Ray
        return None
    m = re.fullmatch(r"reward_loop_worker_(\d+)", name or "")
    return int(m.group(1)) if m else None


async def _joint_local(cfg: RewardConfig, body: dict) -> dict:
    from training.reward_server.engine import (EngineSettings, JointError, JointSample, RequestError, SparseOptions,
                                               local_rendezvous)

    index = _reward_worker_index()
    if index is not None and index > 0:  # a second worker exists: reward.num_workers > 1
        raise ValueError(LOCAL_WORKERS_ERROR.format(n=f"at least {index + 1}"))
    settings = EngineSettings(**{"rendezvous_timeout_s": cfg.rendezvous_timeout_s, **cfg.local})
    engine, rdv = local_rendezvous(settings)
    try:
        await asyncio.to_thread(engine.states.resolve, body["state_path"])
        engine.check_request(engine_request(body))
        sparse = SparseOptions(**body["sparse"]) if body["sparse"] else None
    except RequestError as exc:
        raise RewardServerError(exc.reason) from None
    last = ""
    for attempt in range(cfg.api_max_retries + 1):
        sample = JointSample(body["session_group_id"], body["agent"], body["output"], body["state_path"],
                             body["qa_pairs"], body["expert_outputs"], current_time=body["current_time"],
                             sample_key=body["sample_key"], timeout_s=body["timeout_s"], sparse=sparse)
        try:
            return (await rdv.submit(sample)).to_dict()
        except JointError as exc:
            if not exc.retryable:
                raise RewardServerError(f"the joint rollout could not be scored: {exc.reason}") from None
            last = exc.reason
        if attempt < cfg.api_max_retries:
            await asyncio.sleep(_backoff_s(cfg, attempt))
    raise RewardServerError(f"the joint rollout could not be scored after {cfg.api_max_retries + 1} attempts: {last}")


def engine_request(body: dict):
    from training.reward_server.engine import TaskRequest

    return TaskRequest(body["session_group_id"], body["state_path"], {}, body["qa_pairs"])


async def joint_outcome(cfg: RewardConfig, inputs: SampleInputs, output: Any, sample_key: str | None = None) -> dict:
    body = {"session_group_id": inputs.session_group_id, "agent": inputs.agent,
            "output": "" if output is None else output, "state_path": inputs.state_path,
            "qa_pairs": inputs.qa_pairs, "expert_outputs": inputs.expert_outputs,
            "current_time": inputs.current_time, "sample_key": sample_key or uuid.uuid4().hex,
            "timeout_s": cfg.rendezvous_timeout_s, "sparse": cfg.sparse_options()}
    if cfg.task_reward_mode == "local":
        return await _joint_local(cfg, body)
    return await _joint_via_api(cfg, body)


# --------------------------------------------------------------------------- veRL entry points

async def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                        extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
    """veRL 0.9.1 custom reward function (async): the ADRPO reward of one agent's sample.

    `extra_info` is the RL parquet row's (docs/interfaces.md, "RL parquet rows"): `agent`, `session_group_id`,
    `state_path`, `qa_pairs`, `expert_outputs`; `reward_kwargs` may override any reward_config.json key.
    """
    cfg = _config_from_kwargs(kwargs)
    inputs = SampleInputs.from_extra_info(extra_info)
    joint = await joint_outcome(cfg, inputs, solution_str)
    # Parsing a long hostile output takes a while (linear, capped): off veRL's event loop, which serves the batch.
    return await asyncio.to_thread(score_sample, cfg, inputs.agent, solution_str,
                                   inputs.expert_outputs.get(inputs.agent), joint)


def compute_score_sync(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                       extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
    """A blocking wrapper for callers that run reward functions in threads (api mode: the server joins samples
    across threads and processes; local mode joins only samples on the same event loop, so use `compute_score`)."""
    async def run() -> dict:
        try:
            return await compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
        finally:
            await _close_http_client()

    return asyncio.run(run())
