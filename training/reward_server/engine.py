"""The reward engine: score a joint rollout by building memory on the expert's pre-session state and answering.

One code path serves the HTTP server (`server.py`) and the in-process `local` mode of `reward_function.py`:

- `RewardEngine.build_and_qa(TaskRequest)`: validate each agent's output with `parse_actions` (an invalid agent
  becomes a no-op, reported as such), fork the cached pre-session state (`MemorySystem.fork()`: the loaded vectors
  are shared read-only, each request adds its own), apply the actions, answer every QA over the *whole* state (top-k
  of any type plus the core block, `MemorySystem.answer`) and judge it with the paper protocol
  (`eval.llm_judge.judge_answer`). The QAs of a request run together, requests run together, and every LLM request
  (embeddings, answers, judgments, core compression) passes one shared in-flight bound. Parsing, applying, state
  loading and searches of large indexes run in worker threads, never on the event loop.
- `JointRendezvous`: joins the four agents' samples of one session (scored one at a time by veRL) into joint
  rollouts: the k-th arriving sample of each agent, one to one, keyed by session group id; a slot still missing
  an agent when its timeout expires takes that agent's expert output instead.

Failure policy: infrastructure failure is never a verdict. An embedding, answer, judge or core-compression call that
still fails after the client's retries makes the whole request fail with `UpstreamError` (the server answers 503
`retryable: true`; a retry scores it again): no question is ever counted WRONG because an LLM call failed, and
every such failure is counted in `stats()["llm_failures"]`. User errors raise `RequestError` (`StatePathError` for a
state path) with the HTTP status to answer.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np

import config
from eval.llm_judge import judge_answer
from llm_client import ClientSettings, LLMCallError, LLMClient, SharedLimit
from memory_system import (AGENTS, ENTRY_TYPES, Action, ActionFormatError, MemorySystem, Retrieved, apply,
                           dominant_type, parse_actions)

log = logging.getLogger(__name__)

JUDGE_PROTOCOL = "paper"
# Searching a flat index of this many vectors takes long enough (milliseconds) to go to a worker thread.
THREADED_SEARCH_MIN_VECTORS = 4096
# A state folder holds a handful of files; one with more is not a state (and would make the confinement scan slow).
MAX_STATE_FILES = 1000
MAX_STATE_PATH_CHARS = 4096


# CPU-bound Python (parsing outputs and bodies, applying actions) runs in ONE worker thread: each thread that competes
# for the GIL delays the event loop's turn, so a second CPU thread would only add latency to /health, not
# throughput. File and index loading (which mostly wait or run in C) use asyncio's default threads.
_CPU_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-cpu")


async def run_cpu(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in the CPU worker thread, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_CPU_POOL, partial(fn, *args, **kwargs))


class RequestError(Exception):
    """A request the server will not serve as asked; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StatePathError(RequestError):
    """A state path the server will not or cannot serve (403 outside the root, 404 missing, 422 unreadable)."""


class UpstreamError(Exception):
    """An LLM call that still failed after the client's retries: transient, the request should be retried."""

    def __init__(self, reason: str):
        super().__init__(reason)
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

    def vector(self, text: str) -> np.ndarray | None:
        return self._table.get(text)

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
    call_deadline_s: float = config.DEFAULT_CALL_DEADLINE_S
    max_tokens_answer: int = config.MAX_TOKENS_ANSWER
    max_tokens_judge: int = config.MAX_TOKENS_JUDGE
    max_tokens_compress: int = config.MAX_TOKENS_COMPRESS
    json_schema: bool = False
    client_processes: int = 1  # >1: chat requests sent by that many worker processes (http_workers)
    max_qa_pairs: int = 64  # per request: each costs an answer and a judgment

    def __post_init__(self) -> None:
        for name in ("rendezvous_timeout_s", "max_rendezvous_timeout_s", "timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {v!r}")
        for name in ("max_in_flight", "max_qa_pairs", "state_cache_size", "answer_top_k", "client_processes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {v!r}")

    def client_settings(self) -> tuple[ClientSettings, ClientSettings]:
        """(answer client incl. embeddings, judge client)."""
        emb = dict(embedding_provider=self.embedding_provider, embedding_model=self.embedding_model,
                   embedding_base_url=self.embedding_base_url, embedding_api_key=self.embedding_api_key)
        caps = config.max_tokens_table(answer=self.max_tokens_answer, judge=self.max_tokens_judge,
                                       compress=self.max_tokens_compress)
        common = dict(max_in_flight=self.max_in_flight, max_retries=self.max_retries, timeout_s=self.timeout_s,
                      call_deadline_s=self.call_deadline_s, cache_dir=self.cache_dir, max_tokens_by_task=caps,
                      json_schema=self.json_schema, client_processes=self.client_processes)
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
    verdict: str  # CORRECT | WRONG
    correct: bool
    failed: bool  # always False in a returned result: a failed LLM call fails the request instead
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
        d["n_questions"] = self.total
        d["dominant_agent"] = self.dominant_type  # the public release's name for the same field
        d["invalid_agents"] = sorted(a for a, s in self.agents.items() if s.status == "invalid")
        d["elapsed_s"] = round(self.elapsed_s, 4)
        return d


def validate_outputs(outputs: Mapping[str, Any]) -> tuple[dict[str, list[Action]], dict[str, AgentStatus]]:
    """The validity gate: each agent's output through `parse_actions`; an invalid output becomes a no-op.

    CPU-bound (linear in the outputs' length): callers on the event loop run it in a thread."""
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


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- state cache

class StateCache:
    """Loaded pre-session states, read-only, least recently used first out; concurrent loads of a path coalesce.

    Paths are confined to `root`: a relative path is taken relative to it, and a path that resolves (symlinks
    followed) outside it is refused, as is a folder holding any file that resolves outside it. The key includes
    memory.json's mtime, so a rewritten state is reloaded. A load runs in a worker thread as a task of its own, so
    a waiting request that goes away neither cancels it nor blocks the others waiting for it.
    """

    def __init__(self, root: str | os.PathLike, embedder: LLMClient, *, capacity: int, answer_top_k: int,
                 on_llm_failure: Callable[[str], None] = lambda kind: None):
        self.root = Path(root).resolve()
        self.embedder = embedder
        self.capacity = max(1, capacity)
        self.answer_top_k = answer_top_k
        self._on_llm_failure = on_llm_failure
        self._lru: OrderedDict[tuple[str, int], MemorySystem] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task] = {}
        self._empty: MemorySystem | None = None
        self.hits = self.misses = 0

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def resolve(self, state_path: str | None) -> Path | None:
        """The confined absolute folder of a state, or None for 'no state yet' (empty memory).

        Blocking file-system calls: callers on the event loop run it in a thread."""
        if state_path is None or str(state_path).strip() == "":
            return None
        text = str(state_path)
        shown = repr(text[:200]) + ("..." if len(text) > 200 else "")
        if "\x00" in text:
            raise StatePathError(422, f"state path {shown} contains a NUL byte")
        if len(text) > MAX_STATE_PATH_CHARS:
            raise StatePathError(422, f"state path is {len(text)} characters, over {MAX_STATE_PATH_CHARS}")
        try:
            raw = Path(text).expanduser()
            path = (raw if raw.is_absolute() else self.root / raw).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long, no home folder
            raise StatePathError(422, f"state path {shown} cannot be resolved: {_short(exc)}") from None
        if not self._inside(path):
            raise StatePathError(403, f"state path {shown} is outside the state root")
        try:
            present = MemorySystem.exists(path)
        except (OSError, ValueError) as exc:
            raise StatePathError(422, f"state path {shown} cannot be read: {_short(exc)}") from None
        if not present:
            raise StatePathError(404, f"no memory state at {shown} (expected {path / 'memory.json'})")
        self._check_files(path, shown)
        return path

    def _check_files(self, path: Path, shown: str) -> None:
        """Every file the store may read from the folder stays inside the root (a symlinked file could point at
        any file the server may read)."""
        try:
            with os.scandir(path) as it:
                for n, entry in enumerate(it):
                    if n >= MAX_STATE_FILES:
                        raise StatePathError(422, f"state folder {shown} holds more than {MAX_STATE_FILES} files")
                    if entry.is_symlink() and not self._inside(Path(entry.path).resolve()):
                        raise StatePathError(403, f"state folder {shown}: {entry.name!r} links outside the state "
                                                  f"root")
        except StatePathError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise StatePathError(422, f"state folder {shown} cannot be listed: {_short(exc)}") from None

    async def get(self, path: Path | None) -> MemorySystem:
        if path is None:
            if self._empty is None:
                self._empty = MemorySystem(None, embedder=self.embedder, answer_top_k=self.answer_top_k)
            return self._empty
        try:
            mtime = (path / "memory.json").stat().st_mtime_ns
        except FileNotFoundError:
            raise StatePathError(404, f"no memory state at {str(path)!r}") from None
        except OSError as exc:
            raise StatePathError(422, f"state {str(path)!r} cannot be read: {_short(exc)}") from None
        key = (str(path), mtime)
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return hit
        task = self._loading.get(key)
        if task is None:
            self.misses += 1
            task = asyncio.get_running_loop().create_task(self._load(path, key))
            self._loading[key] = task
            task.add_done_callback(lambda t: (self._loading.pop(key, None), t.cancelled() or t.exception()))
        else:
            self.hits += 1
        return await asyncio.shield(task)

    async def _load(self, path: Path, key: tuple[str, int]) -> MemorySystem:
        try:
            ms = await asyncio.to_thread(MemorySystem.load, path, None, embedder=self.embedder,
                                         answer_top_k=self.answer_top_k)
        except Exception as exc:  # noqa: BLE001 - whatever the store raises on a bad folder, it is unreadable
            raise StatePathError(422, f"unreadable state at {str(path)!r}: {_short(exc)}") from None
        try:
            await ms.ensure_index()  # re-embeds a state saved with other embeddings
        except LLMCallError as exc:
            self._on_llm_failure("state_embed")
            raise UpstreamError(f"embedding the state failed: {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001
            raise StatePathError(422, f"unreadable state at {str(path)!r}: {_short(exc)}") from None
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


LLM_FAILURE_KINDS = ("embed", "answer", "judge", "compress", "state_embed")


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
        self.llm_failures = {k: 0 for k in LLM_FAILURE_KINDS}
        self.states = StateCache(settings.state_root, self.answer_client, capacity=settings.state_cache_size,
                                 answer_top_k=settings.answer_top_k, on_llm_failure=self._llm_failed)
        self.counters = {"requests": 0, "scored": 0, "questions": 0, "failed_questions": 0, "upstream_failures": 0,
                         "request_errors": 0, "cancelled": 0, "internal_errors": 0}

    def _llm_failed(self, kind: str) -> None:
        self.llm_failures[kind] += 1

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
                "max_qa_pairs": self.settings.max_qa_pairs, "state_root": str(self.states.root)}

    def stats(self) -> dict:
        usage = {"answer": self.answer_client.usage.snapshot()}
        if self.judge_client is not self.answer_client:
            usage["judge"] = self.judge_client.usage.snapshot()
        llm_requests = sum(u["calls"] - u["cached"] + u["retries"] for part in usage.values() for u in part.values())
        return {**self.counters, "llm_requests": llm_requests,
                "llm_failures": {**self.llm_failures, "total": sum(self.llm_failures.values())},
                "llm_slots": self.limit.stats(), "usage": usage,
                "state_cache": {"size": len(self.states), "capacity": self.states.capacity,
                                "hits": self.states.hits, "misses": self.states.misses}}

    async def aclose(self) -> None:
        for c in {id(c): c for c in (self.answer_client, self.judge_client)}.values():
            await c.aclose()

    def check_request(self, req: TaskRequest) -> None:
        if len(req.qa_pairs) > self.settings.max_qa_pairs:
            raise RequestError(422, f"{len(req.qa_pairs)} QA pairs, over the cap of {self.settings.max_qa_pairs} "
                                    f"a request")

    async def build_and_qa(self, req: TaskRequest) -> TaskResult:
        """Score one joint rollout. Raises RequestError (a bad request or state), UpstreamError (an LLM call still
        failed after retries: retry the request); cancelling it cancels its LLM calls."""
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        try:
            self.check_request(req)
            path = await asyncio.to_thread(self.states.resolve, req.state_path)
            actions, status = await run_cpu(validate_outputs, req.actions)
            base = await self.states.get(path)
            result = await self._score(base, actions, status, req)
        except RequestError:
            self.counters["request_errors"] += 1
            raise
        except UpstreamError:
            self.counters["upstream_failures"] += 1
            raise
        except asyncio.CancelledError:
            self.counters["cancelled"] += 1
            raise
        except Exception:
            self.counters["internal_errors"] += 1
            raise
        result.elapsed_s = time.perf_counter() - t0
        self.counters["scored"] += 1
        self.counters["questions"] += result.total
        return result

    @staticmethod
    def _prepare(base: MemorySystem, actions: dict[str, list[Action]], session_id: str):
        """Fork the state and apply the entry agents' actions (pure, linear in state size x operations)."""
        ms = base.fork()
        return ms, apply(ms.state, actions, session_id, ms.core_char_limit)

    async def _score(self, base: MemorySystem, actions: dict[str, list[Action]], status: dict[str, AgentStatus],
                     req: TaskRequest) -> TaskResult:
        session_id = req.session_id or req.session_group_id
        ms, applied = await run_cpu(self._prepare, base, actions, session_id)
        questions = [str(q["question"]) for q in req.qa_pairs]
        new_texts = [e.tagged() for e in applied.new_entries]
        texts = list(dict.fromkeys(new_texts + (questions if ms.state.entries or applied.new_entries else [])))
        table = None
        if texts:
            try:
                vectors = await self.embedder.embed(texts, task="embed.reward")
            except LLMCallError as exc:
                self._llm_failed("embed")
                raise UpstreamError(f"embedding failed: {exc.reason}") from None
            table = _PrecomputedEmbedder(self.embedder, texts, vectors)
            ms.embedder = table
        # The core block through the store (it compresses an overflowing block with an LLM call); the entries from
        # the threaded apply above, which does not depend on the core.
        core = await ms.apply_actions({"core": actions.get("core") or []}, session_id,
                                      compress_client=self.answer_client)
        if any("compression failed" in n for n in core.notes):
            self._llm_failed("compress")
            raise UpstreamError(next(n for n in core.notes if "compression failed" in n))
        applied.state.core = ms.state.core
        ms.state = applied.state
        if applied.new_entries:
            new_vecs = np.vstack([table.vector(t) for t in new_texts]).astype(np.float32)
            await asyncio.to_thread(ms.index.add, new_vecs)
        qa = await self._questions(ms, table, req)
        counts = _zero_counts()
        for r in qa:
            for t, n in r.type_counts.items():
                counts[t] = counts.get(t, 0) + n
        correct = sum(r.correct for r in qa)
        return TaskResult(req.session_group_id, correct / len(qa) if qa else 0.0, correct, len(qa), list(qa), counts,
                          dominant_type(counts), len(applied.new_entries), status)

    async def _questions(self, ms: MemorySystem, table: _PrecomputedEmbedder | None,
                         req: TaskRequest) -> list[QAResult]:
        """All questions together; the first that fails upstream cancels the others and fails the request."""
        tasks = [asyncio.ensure_future(self._one_question(ms, table, q, req.current_time)) for q in req.qa_pairs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def _retrieve(self, ms: MemorySystem, table: _PrecomputedEmbedder | None, question: str) -> list[Retrieved]:
        k = self.settings.answer_top_k
        if not ms.state.entries:
            return []
        qvec = table.vector(question) if table is not None else None
        if qvec is None:
            return await ms.retrieve(question, k)
        if ms.index.ntotal < THREADED_SEARCH_MIN_VECTORS:
            return await ms.search_vector(qvec, k)
        hits = await asyncio.to_thread(ms.index.search, qvec, k, None)
        entries = ms.state.entries
        return [Retrieved(entries[i], s) for i, s in hits if i < len(entries)]

    async def _one_question(self, ms: MemorySystem, table: _PrecomputedEmbedder | None, qa: dict,
                            current_time: str | None) -> QAResult:
        question, gold, qtype = str(qa["question"]), str(qa.get("answer", "")), qa.get("type")
        counts = _zero_counts()
        try:
            retrieved = await self._retrieve(ms, table, question)
        except LLMCallError as exc:
            self._llm_failed("embed")
            raise UpstreamError(f"embedding a question failed: {exc.reason}") from None
        # Retrieval is counted whether the answer is right or wrong (attribution counts retrieval).
        for r in retrieved:
            counts[r.entry.type] = counts.get(r.entry.type, 0) + 1
        try:
            ans = await ms.answer(question, self.answer_client, current_time=current_time, retrieved=retrieved)
        except LLMCallError as exc:
            self._llm_failed("answer")
            raise UpstreamError(f"answer call failed: {exc.reason}") from None
        verdict = await judge_answer(self.judge_client, JUDGE_PROTOCOL, question=question, gold=gold,
                                     answer=ans.answer, question_type=qtype or "")
        if verdict.label is None:
            self._llm_failed("judge")
            raise UpstreamError(f"judge call failed: {verdict.error}")
        return QAResult(question, gold, ans.answer, verdict.label, verdict.label == "CORRECT", False, None, counts,
                        qtype)


# --------------------------------------------------------------------------- joint rollouts

@dataclass
class SparseOptions:
    """The sparse-reward ablation: a seeded fraction of joint rollouts get a constant task reward, no attribution."""

    drop_rate: float = 0.5
    seed: int = 42
    default_reward: float = 1.0

    def __post_init__(self) -> None:
        for name in ("drop_rate", "default_reward"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"sparse {name} must be a number within [0, 1], not {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"sparse seed must be an integer, not {self.seed!r}")

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


class JointError(Exception):
    """What every member of a joint rollout that could not be scored receives: `status` to answer with, and
    whether a retry (with the same sample key) may succeed."""

    def __init__(self, status: int, reason: str, retryable: bool):
        super().__init__(reason)
        self.status, self.reason, self.retryable = status, reason, retryable


@dataclass
class _Slot:
    group: str
    ordinal: int
    first: JointSample
    members: dict[str, JointSample]
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = None
    closed: bool = False
    timed_out: bool = False
    sparse: bool = False
    waiters: int = 0
    runs: int = 0


class JointRendezvous:
    """Pairs the k-th arriving sample of each agent of a session group, one to one, into a joint rollout.

    A sample joins the oldest open slot of its group that lacks its agent, or opens a new one. A slot is evaluated
    as soon as it holds all four agents, or when its timeout (counted from its first sample) expires: a missing
    agent then takes its expert output from the samples' `expert_outputs`. Every member of a slot receives the same
    outcome, or the same `JointError`. A resubmission with the same `sample_key` (a retry after a dropped connection
    or a retryable failure) re-attaches to its slot instead of taking a second one, and re-runs a slot whose
    evaluation failed retryably; a key belongs to one group and agent. Finished keys are remembered for
    `result_ttl_s`.

    Every slot's future is resolved on every path: scored, any exception in the evaluation (`JointError`), timeout
    (expert fallback), `shutdown()` (open slots scored with the expert fallback, then whatever is still running is
    cancelled), and cancellation (when every member waiting on a running evaluation has gone, it is cancelled and
    the slot answers retryably, so a resubmission runs it again).
    """

    def __init__(self, evaluate: Callable[[TaskRequest], Awaitable[TaskResult]], *, default_timeout_s: float = 600.0,
                 max_timeout_s: float = 3600.0, result_ttl_s: float = 900.0):
        self._evaluate = evaluate
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.result_ttl_s = result_ttl_s
        self._open: dict[str, list[_Slot]] = {}
        self._ordinals: dict[str, int] = {}
        self._keys: dict[str, _Slot] = {}  # sample key -> its slot (kept result_ttl_s after it finished)
        self._expiry: deque[tuple[float, str]] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._closing_reason: str | None = None
        self.counters = {"samples": 0, "joints": 0, "complete": 0, "timed_out": 0, "sparse": 0, "resubmits": 0,
                         "reruns": 0, "failed": 0, "cancelled": 0, "abandoned": 0}

    def _purge(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            _, key = self._expiry.popleft()
            slot = self._keys.get(key)
            if slot is not None and slot.future.done() and (slot.task is None or slot.task.done()):
                del self._keys[key]

    def open_slots(self) -> int:
        return sum(len(v) for v in self._open.values())

    def running(self) -> int:
        return len(self._tasks)

    async def submit(self, sample: JointSample) -> JointOutcome:
        """The outcome of the sample's joint rollout; raises JointError (or ValueError for an unknown agent)."""
        if sample.agent not in AGENTS:
            raise ValueError(f"unknown agent {sample.agent!r}")
        self._purge()
        key = sample.sample_key or uuid.uuid4().hex
        known = self._keys.get(key)
        if known is not None:
            if known.group != sample.session_group_id or known.members.get(sample.agent) is None or \
                    known.members[sample.agent].sample_key != key:
                raise JointError(422, f"sample_key {key[:80]!r} belongs to another session group or agent "
                                      f"({known.group!r})", False)
            self.counters["resubmits"] += 1
            if known.future.done() and self._retryable_failure(known) and self._closing_reason is None:
                self._rerun(known)
            return await self._wait(known)
        if self._closing_reason is not None:
            raise JointError(503, self._closing_reason, True)
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
        self._keys[key] = slot
        if len(slot.members) == len(AGENTS):
            self._close(slot, timed_out=False)
        return await self._wait(slot)

    @staticmethod
    def _retryable_failure(slot: _Slot) -> bool:
        if slot.future.cancelled():
            return True
        res = slot.future.result()
        return isinstance(res, JointError) and res.retryable

    async def _wait(self, slot: _Slot) -> JointOutcome:
        slot.waiters += 1
        future = slot.future
        try:
            result = await asyncio.shield(future)
        finally:
            slot.waiters -= 1
            if slot.waiters == 0 and slot.task is not None and not slot.task.done():
                # Nobody waits for this evaluation any more (every client went away): stop its LLM work; the slot
                # then answers retryably, so a resubmission of any member runs it again.
                slot.task.cancel("every member of the joint rollout went away")
        if isinstance(result, JointError):
            raise result
        return result

    def _new_slot(self, sample: JointSample) -> _Slot:
        ordinal = self._ordinals.get(sample.session_group_id, 0)
        self._ordinals[sample.session_group_id] = ordinal + 1
        loop = asyncio.get_running_loop()
        slot = _Slot(sample.session_group_id, ordinal, sample, {}, loop.create_future())
        slot.sparse = bool(sample.sparse and sample.sparse.selects(sample.session_group_id, ordinal))
        timeout = self.default_timeout_s if sample.timeout_s is None else sample.timeout_s
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            timeout = self.default_timeout_s
        if not math.isfinite(timeout):
            timeout = self.default_timeout_s
        timeout = min(max(0.0, timeout), self.max_timeout_s)
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
        if slot.waiters == 0 and slot.members and self._closing_reason is None and timed_out:
            # Every member's client went away before the slot filled: no LLM work for nobody. A resubmission of
            # any member re-runs it.
            self.counters["abandoned"] += 1
            self._resolve(slot, JointError(503, "the joint rollout's clients went away before it was scored", True))
            return
        self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.runs += 1
        try:
            task = asyncio.get_running_loop().create_task(self._run(slot, slot.future))
        except Exception as exc:  # noqa: BLE001 - a closed loop: the slot still gets its answer
            self._resolve(slot, JointError(503, f"could not start scoring: {_short(exc)}", True))
            return
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rerun(self, slot: _Slot) -> None:
        self.counters["reruns"] += 1
        slot.future = asyncio.get_running_loop().create_future()
        self._start(slot)

    def _resolve(self, slot: _Slot, result: JointOutcome | JointError, future: asyncio.Future | None = None) -> None:
        future = future or slot.future
        if not future.done():
            future.set_result(result)
            if isinstance(result, JointError):
                self.counters["failed"] += 1
        if not (isinstance(result, JointError) and result.retryable):
            # Final: a resubmission only reads the outcome, so the outputs need not be kept for `result_ttl_s`.
            for m in slot.members.values():
                m.output, m.expert_outputs, m.qa_pairs = None, {}, []
        expiry = time.monotonic() + self.result_ttl_s
        for m in slot.members.values():
            self._expiry.append((expiry, m.sample_key))

    async def _run(self, slot: _Slot, future: asyncio.Future) -> None:
        result: JointOutcome | JointError = JointError(503, "scoring did not finish", True)
        try:
            result = await self._outcome(slot)
        except asyncio.CancelledError:
            self.counters["cancelled"] += 1
            result = JointError(503, self._closing_reason or "scoring was cancelled (its clients went away)", True)
            raise
        except UpstreamError as exc:
            result = JointError(503, exc.reason, True)
        except RequestError as exc:
            result = JointError(exc.status, exc.reason, False)
        except Exception as exc:  # noqa: BLE001 - every waiting sample must get an answer
            log.exception("joint rollout %s#%d failed", slot.group, slot.ordinal)
            result = JointError(500, f"internal error: {_short(exc)}", False)
        finally:
            self._resolve(slot, result, future)

    def _sources(self, slot: _Slot) -> tuple[dict[str, Any], dict[str, str]]:
        outputs: dict[str, Any] = {}
        members: dict[str, str] = {}
        expert = {}
        for m in [slot.first, *slot.members.values()]:
            for a, o in (m.expert_outputs or {}).items():
                if o is not None and o != "" and a not in expert:
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

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Resolve every slot: open ones are scored now with the expert fallback; after `grace_s` whatever is still
        being scored is cancelled and answers 503 retryable. New samples are refused (503 retryable)."""
        self._closing_reason = "the reward server is shutting down"
        for slots in list(self._open.values()):
            for slot in list(slots):
                self._close(slot, timed_out=True)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for t in late:
                t.cancel(self._closing_reason)
            if late:
                await asyncio.wait(late, timeout=1.0)

    def stats(self) -> dict:
        return {**self.counters, "open_slots": self.open_slots(), "running": self.running(),
                "remembered_keys": len(self._keys)}


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
