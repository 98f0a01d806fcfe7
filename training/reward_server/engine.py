"""The reward engine: score a joint rollout by building memory on the expert's pre-session state and answering.

One code path serves the HTTP server (`server.py`) and the in-process `local` mode of `reward_function.py`:

- `RewardEngine.build_and_qa(TaskRequest)`: validate each agent's output with `parse_actions` (an invalid agent
  becomes a no-op, reported as such), fork the cached pre-session state (`MemorySystem.fork()`: the loaded vectors
  are shared read-only, each request adds its own), apply the actions through `MemorySystem.apply_actions`, answer
  every QA over the *whole* state (top-k of any type plus the core block, `MemorySystem.answer`) and judge it with
  the paper protocol (`eval.llm_judge.judge_answer`). The QAs of a request run together, requests run together, and
  every LLM request (embeddings, answers, judgments, core compression) passes one shared in-flight bound.
- `JointRendezvous`: joins the four agents' samples of one session (scored one at a time by veRL) into joint
  rollouts: the k-th arriving sample of each agent, one to one, keyed by session group id; a slot still missing
  an agent when its timeout expires takes that agent's expert output instead.

Failure policy (documented fallbacks, never an exception to the caller): an answer or judge call that still fails
after the client's retries counts the question as wrong and marks it `failed` with the reason; an embedding call
that still fails marks every question of the request failed. Only user errors raise (`StatePathError`).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np

import config
from eval.llm_judge import judge_answer
from llm_client import ClientSettings, LLMCallError, LLMClient, SharedLimit
from memory_system import (AGENTS, ENTRY_TYPES, Action, ActionFormatError, MemoryStoreError, MemorySystem, apply,
                           dominant_type, parse_actions)

log = logging.getLogger(__name__)

JUDGE_PROTOCOL = "paper"


class StatePathError(Exception):
    """A state path the server will not or cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _PrecomputedEmbedder:
    """Serves vectors computed in the request's single embedding batch; anything else goes to the real embedder.

    A request embeds its new entries and its questions in one call, so `apply_actions` and `answer` (which embed
    one text at a time) cost no further round trip.
    """

    def __init__(self, inner: LLMClient, texts: Sequence[str], vectors: np.ndarray):
        self._inner = inner
        self._table = {t: vectors[i] for i, t in enumerate(texts)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def embed(self, texts: list[str], *, task: str = "embed") -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        missing = [t for t in texts if t not in self._table]
        if missing:
            for t, v in zip(missing, await self._inner.embed(missing, task=task)):
                self._table[t] = v
        return np.vstack([self._table[t] for t in texts]).astype(np.float32)


# --------------------------------------------------------------------------- settings and records

@dataclass
class EngineSettings:
    state_root: str = "."
    provider: str = "openai"
    model: str = config.ANSWER_MODEL
    base_url: str | None = None
    api_key: str | None = None
    judge_provider: str | None = None  # None: --provider (openai when --provider is vllm)
    judge_model: str = config.JUDGE_MODEL
    judge_base_url: str | None = None
    judge_api_key: str | None = None
    embedding_provider: str | None = None
    embedding_model: str | None = None
    embedding_base_url: str | None = None
    embedding_api_key: str | None = None
    max_in_flight: int = config.DEFAULT_MAX_IN_FLIGHT
    max_retries: int = config.DEFAULT_MAX_RETRIES
    timeout_s: float = config.DEFAULT_REQUEST_TIMEOUT_S
    answer_top_k: int = config.QA_ANSWERING_TOP_K
    state_cache_size: int = 32
    rendezvous_timeout_s: float = 600.0
    max_rendezvous_timeout_s: float = 3600.0
    cache_dir: str | None = None

    def client_settings(self) -> tuple[ClientSettings, ClientSettings]:
        """(answer client incl. embeddings, judge client)."""
        emb = dict(embedding_provider=self.embedding_provider, embedding_model=self.embedding_model,
                   embedding_base_url=self.embedding_base_url, embedding_api_key=self.embedding_api_key)
        common = dict(max_in_flight=self.max_in_flight, max_retries=self.max_retries, timeout_s=self.timeout_s,
                      cache_dir=self.cache_dir)
        answer = ClientSettings(provider=self.provider, model=self.model, base_url=self.base_url,
                                api_key=self.api_key, **emb, **common)
        jprov = self.judge_provider or ("openai" if self.provider == "vllm" else self.provider)
        same = jprov == self.provider
        judge = ClientSettings(provider=jprov, model=self.judge_model,
                               base_url=self.judge_base_url or (self.base_url if same else None),
                               api_key=self.judge_api_key or (self.api_key if same else None), **emb, **common)
        return answer, judge


@dataclass
class TaskRequest:
    """One joint rollout to score. `actions[agent]` is that agent's raw output (str) or parsed JSON; an agent
    missing from the mapping (or None) contributes nothing and is reported `absent`."""

    session_group_id: str
    state_path: str | None
    actions: Mapping[str, Any]
    qa_pairs: list[dict]
    current_time: str | None = None
    session_id: str | None = None


@dataclass
class AgentStatus:
    status: str  # valid | invalid | absent
    n_actions: int = 0
    reason: str | None = None


@dataclass
class QAResult:
    question: str
    gold: str
    answer: str | None
    verdict: str  # CORRECT | WRONG (a failed question is WRONG)
    correct: bool
    failed: bool
    error: str | None
    type_counts: dict[str, int]
    qa_type: str | None = None


@dataclass
class TaskResult:
    session_group_id: str
    task_reward: float
    correct: int
    total: int
    qa_results: list[QAResult]
    retrieval_counts: dict[str, int]
    dominant_type: str | None
    new_entries: int
    agents: dict[str, AgentStatus]
    failed_questions: int = 0
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def fallback(self) -> bool:
        return self.failed_questions > 0 or self.error is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["success"] = True
        d["fallback"] = self.fallback
        d["dominant_agent"] = self.dominant_type  # the public release's name for the same field
        d["invalid_agents"] = sorted(a for a, s in self.agents.items() if s.status == "invalid")
        d["elapsed_s"] = round(self.elapsed_s, 4)
        return d


def validate_outputs(outputs: Mapping[str, Any]) -> tuple[dict[str, list[Action]], dict[str, AgentStatus]]:
    """The validity gate: each agent's output through `parse_actions`; an invalid output becomes a no-op."""
    actions: dict[str, list[Action]] = {}
    status: dict[str, AgentStatus] = {}
    for agent in AGENTS:
        raw = outputs.get(agent)
        if raw is None:
            actions[agent], status[agent] = [], AgentStatus("absent")
            continue
        try:
            acts = parse_actions(agent, raw)
        except ActionFormatError as exc:
            actions[agent], status[agent] = [], AgentStatus("invalid", reason=exc.reason)
            continue
        actions[agent], status[agent] = acts, AgentStatus("valid", n_actions=len(acts))
    return actions, status


def _zero_counts() -> dict[str, int]:
    return {t: 0 for t in ENTRY_TYPES}


# --------------------------------------------------------------------------- state cache

class StateCache:
    """Loaded pre-session states, read-only, least recently used first out; concurrent loads of a path coalesce.

    Paths are confined to `root`: a relative path is taken relative to it, and a path that resolves (symlinks
    followed) outside it is refused. The key includes memory.json's mtime, so a rewritten state is reloaded.
    """

    def __init__(self, root: str | os.PathLike, embedder: LLMClient, *, capacity: int, answer_top_k: int):
        self.root = Path(root).resolve()
        self.embedder = embedder
        self.capacity = max(1, capacity)
        self.answer_top_k = answer_top_k
        self._lru: OrderedDict[tuple[str, int], MemorySystem] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future] = {}
        self._empty: MemorySystem | None = None
        self.hits = self.misses = 0

    def resolve(self, state_path: str | None) -> Path | None:
        """The confined absolute folder of a state, or None for 'no state yet' (empty memory)."""
        if state_path is None or str(state_path).strip() == "":
            return None
        raw = Path(str(state_path)).expanduser()
        path = (raw if raw.is_absolute() else self.root / raw).resolve()
        if path != self.root and self.root not in path.parents:
            raise StatePathError(403, f"state path {state_path!r} is outside the state root")
        if not MemorySystem.exists(path):
            raise StatePathError(404, f"no memory state at {state_path!r} (expected {path / 'memory.json'})")
        return path

    async def get(self, path: Path | None) -> MemorySystem:
        if path is None:
            if self._empty is None:
                self._empty = MemorySystem(None, embedder=self.embedder, answer_top_k=self.answer_top_k)
            return self._empty
        try:
            mtime = (path / "memory.json").stat().st_mtime_ns
        except FileNotFoundError:
            raise StatePathError(404, f"no memory state at {str(path)!r}") from None
        key = (str(path), mtime)
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return hit
        pending = self._loading.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            ms = await asyncio.to_thread(MemorySystem.load, path, None, embedder=self.embedder,
                                         answer_top_k=self.answer_top_k)
            await ms.ensure_index()
        except MemoryStoreError as exc:
            err = StatePathError(422, str(exc))
            fut.set_exception(err)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise err from None
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            self._loading.pop(key, None)
        fut.set_result(ms)
        self._lru[key] = ms
        for old in [k for k in self._lru if k[0] == key[0] and k != key]:
            del self._lru[old]  # an older version of the same folder
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return ms

    def __len__(self) -> int:
        return len(self._lru)


# --------------------------------------------------------------------------- the engine

def _single_threaded_faiss() -> None:
    """One query against a few thousand vectors takes microseconds; OpenMP's thread team around it costs far more
    (and spins) when many requests search at once on a few cores."""
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except (ImportError, AttributeError):
        pass


class RewardEngine:
    def __init__(self, settings: EngineSettings):
        self.settings = settings
        _single_threaded_faiss()
        self.limit = SharedLimit(settings.max_in_flight)
        answer_s, judge_s = settings.client_settings()
        self.answer_client = LLMClient(answer_s, limit=self.limit)
        same_judge = judge_s.provider == answer_s.provider and judge_s.model == self.answer_client.model and \
            judge_s.base_url == answer_s.base_url
        self.judge_client = self.answer_client if same_judge else LLMClient(judge_s, limit=self.limit)
        self.states = StateCache(settings.state_root, self.answer_client, capacity=settings.state_cache_size,
                                 answer_top_k=settings.answer_top_k)
        self.counters = {"requests": 0, "questions": 0, "failed_questions": 0, "build_failures": 0}

    @property
    def embedder(self) -> LLMClient:
        return self.answer_client

    def describe(self) -> dict:
        return {"answer": f"{self.answer_client.provider}/{self.answer_client.model}",
                "judge": f"{self.judge_client.provider}/{self.judge_client.model}",
                "judge_protocol": JUDGE_PROTOCOL,
                "embedding": f"{self.answer_client.settings.embedding_provider}/"
                             f"{self.answer_client.settings.embedding_model}",
                "answer_top_k": self.settings.answer_top_k, "max_in_flight": self.settings.max_in_flight,
                "state_root": str(self.states.root)}

    def stats(self) -> dict:
        usage = {"answer": self.answer_client.usage.snapshot()}
        if self.judge_client is not self.answer_client:
            usage["judge"] = self.judge_client.usage.snapshot()
        llm_requests = sum(u["calls"] - u["cached"] + u["retries"] for part in usage.values() for u in part.values())
        return {**self.counters, "llm_requests": llm_requests, "llm_slots": self.limit.stats(), "usage": usage,
                "state_cache": {"size": len(self.states), "capacity": self.states.capacity,
                                "hits": self.states.hits, "misses": self.states.misses}}

    async def aclose(self) -> None:
        for c in {id(c): c for c in (self.answer_client, self.judge_client)}.values():
            await c.aclose()

    async def build_and_qa(self, req: TaskRequest) -> TaskResult:
        """Score one joint rollout. Raises StatePathError for a bad state path; every other failure is recorded."""
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        path = self.states.resolve(req.state_path)
        actions, status = validate_outputs(req.actions)
        try:
            base = await self.states.get(path)
        except LLMCallError as exc:  # re-embedding a state saved with other embeddings failed upstream
            result = self._all_failed(req, status, f"loading the state failed: {exc.reason}", 0)
        else:
            result = await self._score_guarded(base, actions, status, req)
        result.elapsed_s = time.perf_counter() - t0
        self.counters["questions"] += result.total
        self.counters["failed_questions"] += result.failed_questions
        return result

    async def _score_guarded(self, base: MemorySystem, actions: dict[str, list[Action]],
                             status: dict[str, AgentStatus], req: TaskRequest) -> TaskResult:
        try:
            return await self._score(base, actions, status, req)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the reward loop down: record and go on
            log.exception("scoring %s failed", req.session_group_id)
            return self._all_failed(req, status, f"internal error: {type(exc).__name__}: {exc}", 0)

    def _all_failed(self, req: TaskRequest, status: dict[str, AgentStatus], reason: str,
                    new_entries: int) -> TaskResult:
        self.counters["build_failures"] += 1
        qa = [QAResult(str(q.get("question", "")), str(q.get("answer", "")), None, "WRONG", False, True, reason,
                       _zero_counts(), q.get("type")) for q in req.qa_pairs]
        return TaskResult(req.session_group_id, 0.0, 0, len(qa), qa, _zero_counts(), None, new_entries, status,
                          failed_questions=len(qa), error=reason)

    async def _score(self, base: MemorySystem, actions: dict[str, list[Action]], status: dict[str, AgentStatus],
                     req: TaskRequest) -> TaskResult:
        ms = base.fork()
        session_id = req.session_id or req.session_group_id
        preview = apply(ms.state, actions, session_id, ms.core_char_limit)  # pure: tells us what will be embedded
        questions = [str(q["question"]) for q in req.qa_pairs]
        texts = list(dict.fromkeys([e.tagged() for e in preview.new_entries] +
                                   (questions if ms.state.entries or preview.new_entries else [])))
        if texts:
            try:
                vectors = await self.embedder.embed(texts, task="embed.reward")
            except LLMCallError as exc:
                return self._all_failed(req, status, f"embedding failed: {exc.reason}", len(preview.new_entries))
            ms.embedder = _PrecomputedEmbedder(self.embedder, texts, vectors)
        applied = await ms.apply_actions(actions, session_id, compress_client=self.answer_client)
        qa = await asyncio.gather(*(self._one_question(ms, q, req.current_time) for q in req.qa_pairs))
        counts = _zero_counts()
        for r in qa:
            for t, n in r.type_counts.items():
                counts[t] = counts.get(t, 0) + n
        correct = sum(r.correct for r in qa)
        return TaskResult(req.session_group_id, correct / len(qa) if qa else 0.0, correct, len(qa), list(qa), counts,
                          dominant_type(counts), len(applied.new_entries), status,
                          failed_questions=sum(r.failed for r in qa))

    async def _one_question(self, ms: MemorySystem, qa: dict, current_time: str | None) -> QAResult:
        question, gold, qtype = str(qa["question"]), str(qa.get("answer", "")), qa.get("type")
        counts = _zero_counts()
        try:
            # Retrieval is counted whether or not the answer call then succeeds (attribution counts retrieval).
            retrieved = await ms.retrieve(question, self.settings.answer_top_k)
            for r in retrieved:
                counts[r.entry.type] = counts.get(r.entry.type, 0) + 1
            ans = await ms.answer(question, self.answer_client, current_time=current_time, retrieved=retrieved)
        except LLMCallError as exc:
            return QAResult(question, gold, None, "WRONG", False, True, f"answer: {exc.reason}", counts, qtype)
        verdict = await judge_answer(self.judge_client, JUDGE_PROTOCOL, question=question, gold=gold,
                                     answer=ans.answer, question_type=qtype or "")
        if verdict.label is None:
            return QAResult(question, gold, ans.answer, "WRONG", False, True, f"judge: {verdict.error}", counts, qtype)
        return QAResult(question, gold, ans.answer, verdict.label, verdict.label == "CORRECT", False, None, counts,
                        qtype)


# --------------------------------------------------------------------------- joint rollouts

@dataclass
class SparseOptions:
    """The sparse-reward ablation: a seeded fraction of joint rollouts get a constant task reward, no attribution."""

    drop_rate: float = 0.5
    seed: int = 42
    default_reward: float = 1.0

    def selects(self, session_group_id: str, ordinal: int) -> bool:
        h = hashlib.sha256(f"{self.seed}\x1f{session_group_id}\x1f{ordinal}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0 ** 64 < self.drop_rate


@dataclass
class JointSample:
    """One policy sample of one agent, as the reward function submits it."""

    session_group_id: str
    agent: str
    output: Any
    state_path: str | None
    qa_pairs: list[dict]
    expert_outputs: dict[str, Any] = field(default_factory=dict)
    current_time: str | None = None
    sample_key: str | None = None
    timeout_s: float | None = None
    sparse: SparseOptions | None = None


@dataclass
class JointOutcome:
    joint_id: str
    session_group_id: str
    ordinal: int
    members: dict[str, str]  # agent -> policy | expert | absent (whose output was evaluated)
    member_keys: dict[str, str | None]
    timed_out: bool
    sparse: bool
    task_reward: float
    dominant_type: str | None
    task: TaskResult | None  # None for a sparse joint rollout (nothing was evaluated)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "task"}
        d["task"] = self.task.to_dict() if self.task is not None else None
        return d


@dataclass
class _Slot:
    group: str
    ordinal: int
    first: JointSample
    members: dict[str, JointSample]
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    closed: bool = False
    timed_out: bool = False
    sparse: bool = False


class JointRendezvous:
    """Pairs the k-th arriving sample of each agent of a session group, one to one, into a joint rollout.

    A sample joins the oldest open slot of its group that lacks its agent, or opens a new one. A slot is evaluated
    as soon as it holds all four agents, or when its timeout (counted from its first sample) expires: a missing
    agent then takes its expert output from the samples' `expert_outputs`. Every member of a slot receives the same
    outcome. A resubmission with the same `sample_key` (a retry after a dropped connection) re-attaches to its slot
    instead of taking a second one; finished keys are remembered for `result_ttl_s`.
    """

    def __init__(self, evaluate: Callable[[TaskRequest], Awaitable[TaskResult]], *, default_timeout_s: float = 600.0,
                 max_timeout_s: float = 3600.0, result_ttl_s: float = 900.0):
        self._evaluate = evaluate
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.result_ttl_s = result_ttl_s
        self._open: dict[str, list[_Slot]] = {}
        self._ordinals: dict[str, int] = {}
        self._keys: dict[str, asyncio.Future] = {}  # sample key -> its slot's outcome (kept result_ttl_s after)
        self._expiry: deque[tuple[float, str]] = deque()
        self._tasks: set[asyncio.Task] = set()
        self.counters = {"samples": 0, "joints": 0, "complete": 0, "timed_out": 0, "sparse": 0, "resubmits": 0}

    def _purge(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            _, key = self._expiry.popleft()
            fut = self._keys.get(key)
            if fut is not None and fut.done():
                del self._keys[key]

    def open_slots(self) -> int:
        return sum(len(v) for v in self._open.values())

    async def submit(self, sample: JointSample) -> JointOutcome:
        if sample.agent not in AGENTS:
            raise ValueError(f"unknown agent {sample.agent!r}")
        self._purge()
        key = sample.sample_key or uuid.uuid4().hex
        known = self._keys.get(key)
        if known is not None:
            self.counters["resubmits"] += 1
            return await asyncio.shield(known)
        self.counters["samples"] += 1
        slots = self._open.setdefault(sample.session_group_id, [])
        slot = next((s for s in slots if sample.agent not in s.members), None)
        if slot is None:
            slot = self._new_slot(sample)
            slots.append(slot)
        elif slot.first.state_path != sample.state_path:
            log.warning("session group %s: samples disagree on the state path (%r vs %r); using the first",
                        sample.session_group_id, slot.first.state_path, sample.state_path)
        sample.sample_key = key
        slot.members[sample.agent] = sample
        self._keys[key] = slot.future
        if len(slot.members) == len(AGENTS):
            self._close(slot, timed_out=False)
        return await asyncio.shield(slot.future)

    def _new_slot(self, sample: JointSample) -> _Slot:
        ordinal = self._ordinals.get(sample.session_group_id, 0)
        self._ordinals[sample.session_group_id] = ordinal + 1
        loop = asyncio.get_running_loop()
        slot = _Slot(sample.session_group_id, ordinal, sample, {}, loop.create_future())
        slot.sparse = bool(sample.sparse and sample.sparse.selects(sample.session_group_id, ordinal))
        timeout = self.default_timeout_s if sample.timeout_s is None else sample.timeout_s
        timeout = min(max(0.0, float(timeout)), self.max_timeout_s)
        slot.timer = loop.call_later(timeout, self._close, slot, True)
        self.counters["joints"] += 1
        return slot

    def _close(self, slot: _Slot, timed_out: bool) -> None:
        if slot.closed:
            return
        slot.closed, slot.timed_out = True, timed_out
        if slot.timer is not None:
            slot.timer.cancel()
        group = self._open.get(slot.group, [])
        if slot in group:
            group.remove(slot)
        if not group:
            self._open.pop(slot.group, None)
        self.counters["timed_out" if timed_out else "complete"] += 1
        task = asyncio.get_running_loop().create_task(self._run(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, slot: _Slot) -> None:
        try:
            outcome = await self._outcome(slot)
        except Exception as exc:  # noqa: BLE001 - every waiting sample must get an answer
            log.exception("joint rollout %s#%d failed", slot.group, slot.ordinal)
            outcome = self._failed_outcome(slot, f"internal error: {type(exc).__name__}: {exc}")
        if not slot.future.done():
            slot.future.set_result(outcome)
        expiry = time.monotonic() + self.result_ttl_s
        for m in slot.members.values():
            self._expiry.append((expiry, m.sample_key))

    def _sources(self, slot: _Slot) -> tuple[dict[str, Any], dict[str, str]]:
        outputs: dict[str, Any] = {}
        members: dict[str, str] = {}
        expert = {}
        for m in [slot.first, *slot.members.values()]:
            for a, o in (m.expert_outputs or {}).items():
                if o not in (None, "") and a not in expert:
                    expert[a] = o
        for agent in AGENTS:
            if agent in slot.members:
                outputs[agent], members[agent] = slot.members[agent].output, "policy"
            elif expert.get(agent) is not None:
                outputs[agent], members[agent] = expert[agent], "expert"
            else:
                outputs[agent], members[agent] = None, "absent"
        return outputs, members

    def _joint_id(self, slot: _Slot) -> str:
        return f"{slot.group}#{slot.ordinal}"

    async def _outcome(self, slot: _Slot) -> JointOutcome:
        outputs, members = self._sources(slot)
        keys = {a: (slot.members[a].sample_key if a in slot.members else None) for a in AGENTS}
        if slot.sparse:
            self.counters["sparse"] += 1
            return JointOutcome(self._joint_id(slot), slot.group, slot.ordinal, members, keys, slot.timed_out, True,
                                float(slot.first.sparse.default_reward), None, None)
        first = slot.first
        task = await self._evaluate(TaskRequest(slot.group, first.state_path, outputs, first.qa_pairs,
                                                current_time=first.current_time))
        return JointOutcome(self._joint_id(slot), slot.group, slot.ordinal, members, keys, slot.timed_out, False,
                            task.task_reward, task.dominant_type, task)

    def _failed_outcome(self, slot: _Slot, reason: str) -> JointOutcome:
        outputs, members = self._sources(slot)
        keys = {a: (slot.members[a].sample_key if a in slot.members else None) for a in AGENTS}
        qa = [QAResult(str(q.get("question", "")), str(q.get("answer", "")), None, "WRONG", False, True, reason,
                       _zero_counts(), q.get("type")) for q in slot.first.qa_pairs]
        status = validate_outputs(outputs)[1]
        task = TaskResult(slot.group, 0.0, 0, len(qa), qa, _zero_counts(), None, 0, status,
                          failed_questions=len(qa), error=reason)
        return JointOutcome(self._joint_id(slot), slot.group, slot.ordinal, members, keys, slot.timed_out, False,
                            0.0, None, task)

    def stats(self) -> dict:
        return {**self.counters, "open_slots": self.open_slots(), "remembered_keys": len(self._keys)}


# --------------------------------------------------------------------------- in-process (local mode) singletons

_LOCAL: dict[tuple, tuple[RewardEngine, dict[int, JointRendezvous]]] = {}


def local_rendezvous(settings: EngineSettings) -> tuple[RewardEngine, JointRendezvous]:
    """The process-wide engine for `settings` and its rendezvous on the running event loop (local mode)."""
    key = tuple(sorted(asdict(settings).items()))
    hit = _LOCAL.get(key)
    if hit is None:
        hit = (RewardEngine(settings), {})
        _LOCAL[key] = hit
    engine, per_loop = hit
    loop = asyncio.get_running_loop()
    rdv = per_loop.get(id(loop))
    if rdv is None or getattr(rdv, "_loop", None) is not loop:
        rdv = JointRendezvous(engine.build_and_qa, default_timeout_s=settings.rendezvous_timeout_s,
                              max_timeout_s=settings.max_rendezvous_timeout_s)
        rdv._loop = loop  # type: ignore[attr-defined]
        per_loop[id(loop)] = rdv
    return engine, rdv

