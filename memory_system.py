"""The memory model: decide (agents emit JSON), then apply (a pure function changes memory).

- `parse_actions(agent, raw)` validates one agent's output against that agent's allowed actions and required
  fields. The RL validity gate, the evaluation runner and the trajectory recorder all call it.
- `apply(state, actions, session)` is the only code that changes memory. Evaluation, expert trajectories and the
  reward server all build memory through `MemorySystem.apply_actions`, which calls it.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

import config
import prompts
from llm_client import MAX_REPLY_CHARS, LLMCallError, LLMClient, extract_json
from memory_store import (MemoryStoreError, SessionLog, atomic_write_text, read_faiss_index,  # noqa: F401
                          read_memory_file, write_faiss_index)

log = logging.getLogger(__name__)

AGENTS = ("core", "episodic", "semantic", "procedural")
ENTRY_TYPES = ("episodic", "semantic", "procedural")
ALLOWED_ACTIONS = {
    "core": ("APPEND", "REPLACE", "REWRITE"),
    "episodic": ("ADD", "UPDATE", "MERGE"),
    "semantic": ("ADD", "UPDATE", "SKIP"),
    "procedural": ("ADD", "UPDATE"),
}
# Attribution tie order (PAPER §5): episodic, then semantic, then procedural.
TYPE_PRIORITY = ENTRY_TYPES
MEMORY_FILE = "memory.json"
INDEX_FILE = "index.faiss"


class ActionFormatError(ValueError):
    """An agent output that breaks its schema; `reason` says what is wrong."""

    def __init__(self, agent: str, reason: str):
        super().__init__(f"{agent}: {reason}")
        self.agent = agent
        self.reason = reason


# --------------------------------------------------------------------------- actions

@dataclass(frozen=True)
class Action:
    agent: str
    op: str
    content: str | None = None  # core APPEND / REWRITE
    old_text: str | None = None  # core REPLACE
    new_text: str | None = None  # core REPLACE
    memory: str | None = None  # ADD
    old_memory: str | None = None  # UPDATE
    new_memory: str | None = None  # UPDATE / MERGE
    old_memories: tuple[str, ...] | None = None  # MERGE
    reason: str | None = None  # SKIP

    def to_dict(self) -> dict:
        """The action in the agent's own output format."""
        if self.agent == "core":
            d = {"operation": self.op}
            if self.op == "REPLACE":
                d.update(old_text=self.old_text, new_text=self.new_text)
            else:
                d["content"] = self.content
            return d
        d = {"action": self.op}
        if self.op == "ADD":
            d["memory"] = self.memory
        elif self.op == "UPDATE":
            d.update(old_memory=self.old_memory, new_memory=self.new_memory)
        elif self.op == "MERGE":
            d.update(old_memories=list(self.old_memories or ()), new_memory=self.new_memory)
        elif self.op == "SKIP" and self.reason is not None:
            d["reason"] = self.reason
        return d

    def written_text(self) -> str:
        """The text this action writes into memory (what the length penalty measures)."""
        if self.op in ("APPEND", "REWRITE"):
            return self.content or ""
        if self.op == "REPLACE":
            return self.new_text or ""
        if self.op == "ADD":
            return self.memory or ""
        if self.op in ("UPDATE", "MERGE"):
            return self.new_memory or ""
        return ""


def actions_to_output(agent: str, actions: Sequence[Action]) -> dict:
    """The JSON object an agent would have emitted for these actions."""
    if agent == "core":
        return actions[0].to_dict() if actions else {}
    return {"operations": [a.to_dict() for a in actions]}


# An agent's output is untrusted (in RL it is whatever the policy emits): parsing it raises ActionFormatError and
# nothing else, takes time linear in its length, and caps what it accepts. The text cap is extract_json's
# (MAX_REPLY_CHARS, well above the paper's 6,000-token response limit); an output given as parsed JSON is held to
# the same number of characters over the fields it writes. MAX_OPERATIONS bounds one entry agent's list: an expert
# session writes a few dozen at most.
MAX_OPERATIONS = 256
# The top-level keys an output may have (the paper's rule: only that agent's allowed actions with their fields).
_TOP_LEVEL_KEYS = {"core": frozenset({"operation", "content", "old_text", "new_text"})}
_ENTRY_TOP_LEVEL_KEYS = frozenset({"operations"})


def _req_str(agent: str, item: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ActionFormatError(agent, f"{where}: field {key!r} must be a string")
    if not allow_empty and not value.strip():
        raise ActionFormatError(agent, f"{where}: field {key!r} is empty")
    return value.strip()


def parse_actions(agent: str, raw: str | dict) -> list[Action]:
    """Validate one agent's output. Returns its actions (possibly none) or raises ActionFormatError (only that,
    whatever the input)."""
    try:
        actions = _parse_actions(agent, raw)
    except ActionFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, a type no check foresaw: all invalid
        raise ActionFormatError(str(agent)[:40], f"unparseable output ({type(exc).__name__})") from None
    written = sum(len(a.written_text()) + len(a.old_text or a.old_memory or "") +
                  sum(len(o) for o in a.old_memories or ()) for a in actions)
    if written > MAX_REPLY_CHARS:
        raise ActionFormatError(agent, f"output writes {written} characters, over the {MAX_REPLY_CHARS}-character cap")
    return actions


def _no_unknown_keys(agent: str, obj: dict) -> None:
    unknown = [k for k in obj if k not in _TOP_LEVEL_KEYS.get(agent, _ENTRY_TOP_LEVEL_KEYS)]
    if unknown:
        names = ", ".join(repr(str(k)[:40]) for k in unknown[:5])
        raise ActionFormatError(agent, f"unknown top-level key(s) {names}")


def _parse_actions(agent: str, raw: str | dict) -> list[Action]:
    if not isinstance(agent, str) or agent not in ALLOWED_ACTIONS:
        raise ActionFormatError(str(agent)[:40], f"unknown agent (expected one of {', '.join(AGENTS)})")
    if isinstance(raw, str):
        try:
            obj = extract_json(raw)
        except ValueError as exc:
            raise ActionFormatError(agent, str(exc)) from None
    else:
        obj = raw
    if not isinstance(obj, dict):
        raise ActionFormatError(agent, "output must be a JSON object")
    allowed = ALLOWED_ACTIONS[agent]

    if agent == "core":
        op = obj.get("operation")
        if not isinstance(op, str):
            raise ActionFormatError(agent, "missing 'operation' (one of APPEND, REPLACE, REWRITE)")
        op = op.strip().upper()
        if op not in allowed:
            raise ActionFormatError(agent, f"operation {op[:40]!r} is not allowed (allowed: {', '.join(allowed)})")
        _no_unknown_keys(agent, obj)
        if op == "REPLACE":
            return [Action(agent, op, old_text=_req_str(agent, obj, "old_text", op),
                           new_text=_req_str(agent, obj, "new_text", op, allow_empty=True))]
        return [Action(agent, op, content=_req_str(agent, obj, "content", op))]

    ops = obj.get("operations")
    if not isinstance(ops, list):
        raise ActionFormatError(agent, "missing 'operations' list")
    _no_unknown_keys(agent, obj)
    if len(ops) > MAX_OPERATIONS:
        raise ActionFormatError(agent, f"{len(ops)} operations, over the cap of {MAX_OPERATIONS}")
    out: list[Action] = []
    for i, item in enumerate(ops):
        where = f"operations[{i}]"
        if not isinstance(item, dict):
            raise ActionFormatError(agent, f"{where} must be an object")
        op = item.get("action")
        if not isinstance(op, str):
            raise ActionFormatError(agent, f"{where}: missing 'action'")
        op = op.strip().upper()
        if op not in allowed:
            raise ActionFormatError(agent, f"{where}: action {op[:40]!r} is not allowed "
                                           f"(allowed: {', '.join(allowed)})")
        where = f"{where} {op}"
        if op == "ADD":
            out.append(Action(agent, op, memory=_req_str(agent, item, "memory", where)))
        elif op == "UPDATE":
            out.append(Action(agent, op, old_memory=_req_str(agent, item, "old_memory", where),
                              new_memory=_req_str(agent, item, "new_memory", where)))
        elif op == "MERGE":
            olds = item.get("old_memories")
            if not isinstance(olds, list) or not olds or len(olds) > MAX_OPERATIONS or \
                    not all(isinstance(o, str) and o.strip() for o in olds):
                raise ActionFormatError(agent, f"{where}: 'old_memories' must be a non-empty list of strings")
            out.append(Action(agent, op, old_memories=tuple(o.strip() for o in olds),
                              new_memory=_req_str(agent, item, "new_memory", where)))
        else:  # SKIP
            reason = item.get("reason")
            out.append(Action(agent, op, reason=reason[:MAX_REPLY_CHARS] if isinstance(reason, str) else None))
    return out


# --------------------------------------------------------------------------- state and apply

@dataclass(frozen=True)
class MemoryEntry:
    id: str
    type: str
    text: str
    session: str
    supersedes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "text": self.text, "session": self.session,
                "supersedes": list(self.supersedes)}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryEntry":
        return cls(id=str(d["id"]), type=str(d["type"]), text=str(d["text"]), session=str(d.get("session", "")),
                   supersedes=tuple(d.get("supersedes") or ()))

    def tagged(self) -> str:
        return prompts.render_entry(self.type, self.text)


@dataclass
class MemoryState:
    core: str = ""
    entries: list[MemoryEntry] = field(default_factory=list)

    def copy(self) -> "MemoryState":
        return MemoryState(self.core, list(self.entries))  # entries are immutable

    def to_dict(self) -> dict:
        return {"core": self.core, "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryState":
        return cls(core=str(d.get("core") or ""), entries=[MemoryEntry.from_dict(e) for e in d.get("entries") or []])


@dataclass
class ApplyResult:
    state: MemoryState
    new_entries: list[MemoryEntry]
    core_overflow: bool
    notes: list[str] = field(default_factory=list)


_NUM_PREFIX = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:\[(?:EPISODIC|SEMANTIC|PROCEDURAL)\]\s*)?", re.IGNORECASE)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", _NUM_PREFIX.sub("", text)).strip().lower()


def _match_ids(state_entries: list[MemoryEntry], entry_type: str, old_texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Ids of the entries an UPDATE/MERGE refers to (latest entry with that text, its own type first)."""
    by_text: dict[str, str] = {}
    any_type: dict[str, str] = {}
    for e in state_entries:  # later entries overwrite: the latest copy of a text wins
        key = _norm(e.text)
        any_type[key] = e.id
        if e.type == entry_type:
            by_text[key] = e.id
    ids, missing = [], []
    for old in old_texts:
        key = _norm(old)
        hit = by_text.get(key) or any_type.get(key)
        if hit is None:  # agents sometimes drop the "Details" tail: accept an unambiguous prefix
            cands = [e.id for e in state_entries if e.type == entry_type and key and _norm(e.text).startswith(key)]
            hit = cands[-1] if cands else None
        if hit is None:
            missing.append(old)
        elif hit not in ids:
            ids.append(hit)
    return ids, missing


def apply(state: MemoryState, actions: dict[str, Sequence[Action]], session: str,
          core_char_limit: int = config.CORE_MEMORY_CHAR_LIMIT) -> ApplyResult:
    """Apply the agents' actions to a copy of `state`, in the fixed order core, episodic, semantic, procedural.

    UPDATE and MERGE never destroy: the new entry is added and links the ids it supersedes. Entry ids are
    sequential, so the same inputs always give the same memory.
    """
    new = state.copy()
    notes: list[str] = []
    for a in actions.get("core") or ():
        if a.op == "APPEND":
            new.core = f"{new.core.rstrip()}\n{a.content}".strip() if new.core.strip() else a.content
        elif a.op == "REWRITE":
            new.core = a.content
        elif a.op == "REPLACE":
            if a.old_text in new.core:
                new.core = new.core.replace(a.old_text, a.new_text, 1)
            else:
                # The fact the agent wanted to correct is not there verbatim: keep the new fact rather than lose it.
                notes.append("core REPLACE: old_text not found; new_text appended")
                if a.new_text:
                    new.core = f"{new.core.rstrip()}\n{a.new_text}".strip()
    added: list[MemoryEntry] = []
    pre_entries = state.entries
    for agent in ENTRY_TYPES:
        for a in actions.get(agent) or ():
            if a.op == "SKIP":
                continue
            supersedes: list[str] = []
            if a.op == "UPDATE":
                supersedes, missing = _match_ids(pre_entries, agent, [a.old_memory])
            elif a.op == "MERGE":
                supersedes, missing = _match_ids(pre_entries, agent, a.old_memories or ())
            else:
                missing = []
            if missing:
                notes.append(f"{agent} {a.op}: {len(missing)} old memory text(s) not found; new entry added unlinked")
            entry = MemoryEntry(id=f"m{len(new.entries):06d}", type=agent, text=a.written_text(), session=session,
                                supersedes=tuple(supersedes))
            new.entries.append(entry)
            added.append(entry)
    return ApplyResult(state=new, new_entries=added, core_overflow=len(new.core) > core_char_limit, notes=notes)


def no_op_actions() -> dict[str, list[Action]]:
    return {a: [] for a in AGENTS}


# --------------------------------------------------------------------------- vector index

_OMP_SET = False


def _one_search_thread() -> None:
    """Searches here are one query over one sample's vectors: FAISS's OpenMP threads cannot speed that up, and
    after each parallel region they spin-wait, taking a core from the event loop (and from a local model server)
    at thousands of searches a second. One thread, unless OMP_NUM_THREADS says otherwise."""
    global _OMP_SET
    if not _OMP_SET:
        _OMP_SET = True
        if not os.environ.get("OMP_NUM_THREADS"):
            import faiss

            faiss.omp_set_num_threads(1)


class VectorIndex:
    """Cosine similarity over L2-normalised vectors (FAISS inner product), keyed by entry position.

    A fork shares its parent's index read-only and keeps its own additions in a small delta index, so a reward
    request can extend an expert state without copying it.
    """

    def __init__(self, dim: int | None = None, parent: "VectorIndex | None" = None):
        self.parent = parent
        self.dim = dim if dim is not None else (parent.dim if parent else None)
        self._index = None
        self._offset = parent.ntotal if parent else 0

    def _ensure(self, dim: int) -> None:
        import faiss

        if self.dim is None:
            self.dim = dim
        if dim != self.dim:
            raise ValueError(f"embedding dimension {dim} does not match the index ({self.dim})")
        if self._index is None:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def own_count(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def ntotal(self) -> int:
        return self._offset + self.own_count

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their ids continue from the current count."""
        if len(vectors) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._ensure(vectors.shape[1])
        ids = np.arange(self.ntotal, self.ntotal + len(vectors), dtype=np.int64)
        self._index.add_with_ids(vectors, ids)

    def truncate(self, n: int) -> None:
        """Drop ids >= n (vectors written before a crash stopped the memory file from being written)."""
        if self._index is None or self.ntotal <= n:
            return
        import faiss

        self._index.remove_ids(faiss.IDSelectorRange(max(n, self._offset), self.ntotal))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        _one_search_thread()
        hits: list[tuple[int, float]] = []
        if self.parent is not None:
            hits.extend(self.parent.search(query, k, allowed[allowed < self._offset] if allowed is not None else None))
        if self._index is not None and self._index.ntotal and k > 0:
            import faiss

            params = None
            if allowed is not None:
                own = allowed[allowed >= self._offset].astype(np.int64)
                if len(own) == 0:
                    return sorted(hits, key=lambda h: (-h[1], h[0]))[:k]
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(own))
            kk = min(k, int(self._index.ntotal))
            D, I = self._index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), kk, params=params)
            hits.extend((int(i), float(d)) for i, d in zip(I[0], D[0]) if i >= 0)
        return sorted(hits, key=lambda h: (-h[1], h[0]))[:k]

    def save(self, path: str | os.PathLike) -> None:
        import faiss

        if self.parent is not None:
            raise ValueError("a forked index is not saved")
        index = self._index if self._index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim or 1))
        write_faiss_index(index, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex":
        index = read_faiss_index(path)
        # An empty index was saved with a placeholder dimension: let the first add fix the real one.
        vi = cls(dim=index.d if index.ntotal else None)
        if index.ntotal:
            vi._index = index
        return vi


# --------------------------------------------------------------------------- the memory system

def render_session(messages: Iterable[Any]) -> str:
    """One message per line with its role tag; newlines inside a message are folded so the line structure holds."""
    lines = []
    for m in messages:
        role = getattr(m, "role", None) or (m.get("role") if isinstance(m, dict) else "other")
        content = getattr(m, "content", None)
        if content is None and isinstance(m, dict):
            content = m.get("content", "")
        content = re.sub(r"\s*\n\s*", " / ", str(content or "").strip())
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


class SessionLike(Protocol):
    id: str
    time: str | None
    messages: list


@dataclass
class AgentCall:
    """One agent's decision for one session: what the recorder logs and the runner counts."""

    agent: str
    task: str
    messages: list[dict]
    inputs: dict
    raw_output: str | None
    actions: list[dict]
    model: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    error: str | None = None
    error_kind: str | None = None  # LLMCallError.kind: "invalid" is the model's output; anything else the endpoint's

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SessionResult:
    """One session's decisions and, when `applied`, their effect on memory.

    A session is applied when every agent either produced valid actions or produced output that stayed invalid
    after its budget (the model's own result: that agent contributes no actions, as the RL validity gate does).
    When an agent's call failed for any other reason (the endpoint: transport, timeout, context, auth), nothing of
    the session is applied and it is not done: the caller stops the sample there and a rerun tries it again.
    """

    session_id: str
    calls: dict[str, AgentCall]
    new_entries: list[MemoryEntry]
    failures: dict[str, str]
    notes: list[str]
    core_compressed: bool = False
    applied: bool = True
    failure_kinds: dict[str, str] = field(default_factory=dict)

    @property
    def invalid_agents(self) -> dict[str, str]:
        return {a: r for a, r in self.failures.items() if self.failure_kinds.get(a) == "invalid"}

    @property
    def blocking_failures(self) -> dict[str, str]:
        return {a: r for a, r in self.failures.items() if self.failure_kinds.get(a) != "invalid"}


@dataclass
class Retrieved:
    entry: MemoryEntry
    score: float


@dataclass
class AnswerResult:
    answer: str
    retrieved: list[Retrieved]
    core: str
    model: str
    latency_s: float = 0.0
    error: str | None = None
    finish_reason: str | None = None

    def type_counts(self) -> dict[str, int]:
        counts = {t: 0 for t in ENTRY_TYPES}
        for r in self.retrieved:
            counts[r.entry.type] = counts.get(r.entry.type, 0) + 1
        return counts


class MemorySystem:
    """One sample's memory: state + vector index, built session by session through `apply`."""

    def __init__(self, builder: LLMClient | None, *, embedder: LLMClient | None = None,
                 construction_top_k: int = config.MEMORY_CONSTRUCTION_TOP_K,
                 answer_top_k: int = config.QA_ANSWERING_TOP_K,
                 core_char_limit: int = config.CORE_MEMORY_CHAR_LIMIT,
                 core_compress_target: int = config.CORE_MEMORY_COMPRESS_TARGET):
        self.builder = builder
        self.embedder = embedder or builder
        if self.embedder is None:
            raise ValueError("MemorySystem needs a client for embeddings")
        self.construction_top_k = construction_top_k
        self.answer_top_k = answer_top_k
        self.core_char_limit = core_char_limit
        self.core_compress_target = core_compress_target
        self.state = MemoryState()
        self.index = VectorIndex()
        self.meta: dict[str, Any] = {"sessions_done": [], "session_failures": {}}
        self._saved: dict[str, Any] | None = None  # what `persist` last wrote: None = nothing on disk yet
        self._unsaved_vectors: list[np.ndarray] = []

    # ------------------------------------------------------------------ search
    def _type_positions(self, types: Sequence[str]) -> np.ndarray:
        return np.array([i for i, e in enumerate(self.state.entries) if e.type in types], dtype=np.int64)

    async def search_vector(self, qvec: np.ndarray, k: int, types: Sequence[str] | None = None) -> list[Retrieved]:
        if not self.state.entries or k <= 0:
            return []
        allowed = self._type_positions(types) if types else None
        if allowed is not None and len(allowed) == 0:
            return []
        hits = self.index.search(qvec, k, allowed)
        return [Retrieved(self.state.entries[i], s) for i, s in hits if i < len(self.state.entries)]

    async def search(self, query: str, k: int, types: Sequence[str] | None = None) -> list[Retrieved]:
        if not self.state.entries:
            return []
        qvec = (await self.embedder.embed([query], task="embed.query"))[0]
        return await self.search_vector(qvec, k, types)

    # ------------------------------------------------------------------ build
    def agent_prompts(self, session_text: str, session_time: str | None,
                      existing: dict[str, list[str]]) -> dict[str, prompts.Prompt]:
        return {agent: prompts.agent_prompt(agent, core=self.state.core, existing=existing.get(agent, []),
                                            session_text=session_text, session_time=session_time)
                for agent in AGENTS}

    async def existing_for_agents(self, session_text: str,
                                  query_vector: np.ndarray | None = None) -> dict[str, list[str]]:
        """Each entry agent sees the top-k entries of its own type most similar to the session."""
        if not self.state.entries:
            return {t: [] for t in ENTRY_TYPES}
        qvec = query_vector if query_vector is not None else \
            (await self.embedder.embed([session_text], task="embed.session"))[0]
        out = {}
        for t in ENTRY_TYPES:
            out[t] = [r.entry.text for r in await self.search_vector(qvec, self.construction_top_k, [t])]
        return out

    async def prepare_session(self, session: SessionLike) -> dict[str, prompts.Prompt]:
        """The four agents' exact prompts for `session` on the current (pre-session) state."""
        text = render_session(session.messages)
        return self.agent_prompts(text, session.time, await self.existing_for_agents(text))

    async def _decide(self, agent: str, prompt: prompts.Prompt) -> tuple[list[Action], AgentCall]:
        t0 = time.perf_counter()
        try:
            actions, res = await self.builder.chat_json(prompt, lambda text: parse_actions(agent, text))
        except LLMCallError as exc:
            call = AgentCall(agent, prompt.task, prompt.messages, prompt.inputs, exc.last_output, [],
                             self.builder.model, time.perf_counter() - t0, 0, 0, exc.attempts, error=exc.reason,
                             error_kind=exc.kind)
            return [], call
        call = AgentCall(agent, prompt.task, prompt.messages, prompt.inputs, res.text, [a.to_dict() for a in actions],
                         res.model, res.latency_s, res.prompt_tokens, res.completion_tokens, res.attempts)
        return actions, call

    async def build_session(self, session: SessionLike, *, query_vector: np.ndarray | None = None) -> SessionResult:
        """Run the four agents concurrently on the pre-session state, then apply their actions in fixed order.

        `query_vector`: the session text's embedding when the caller computed it ahead (same result, one round trip
        fewer). See SessionResult for when a session is not applied."""
        if self.builder is None:
            raise ValueError("this MemorySystem has no builder client")
        text = render_session(session.messages)
        agent_prompts = self.agent_prompts(text, session.time, await self.existing_for_agents(text, query_vector))
        decided = await asyncio.gather(*(self._decide(a, agent_prompts[a]) for a in AGENTS))
        actions = {a: acts for a, (acts, _) in zip(AGENTS, decided)}
        calls = {a: call for a, (_, call) in zip(AGENTS, decided)}
        failures = {a: c.error for a, c in calls.items() if c.error}
        kinds = {a: c.error_kind or "transport" for a, c in calls.items() if c.error}
        if any(k != "invalid" for k in kinds.values()):
            return SessionResult(session.id, calls, [], failures, [], applied=False, failure_kinds=kinds)
        result = await self.apply_actions(actions, session.id)
        self.meta["sessions_done"].append(session.id)
        if failures:
            self.meta["session_failures"][session.id] = failures
        return SessionResult(session.id, calls, result.new_entries, failures, result.notes,
                             core_compressed=any("compressed" in n for n in result.notes), failure_kinds=kinds)

    async def apply_actions(self, actions: dict[str, Sequence[Action]], session_id: str,
                            compress_client: LLMClient | None = None) -> ApplyResult:
        """`apply`, then embed the new entries in one batch and keep the core block within its limit."""
        result = apply(self.state, actions, session_id, self.core_char_limit)
        if result.new_entries:
            vecs = await self.embedder.embed([e.tagged() for e in result.new_entries], task="embed.entries")
            try:
                self.index.add(vecs)
                self._unsaved_vectors.append(np.asarray(vecs, dtype=np.float32))
            except ValueError as exc:  # vectors of another dimension than the stored ones
                raise LLMCallError(f"{exc}: the embeddings endpoint returns vectors that do not fit this memory",
                                   task="embed.entries", kind="config") from None
        self.state = result.state
        if result.core_overflow:
            self.state.core = await self._compress_core(self.state.core, compress_client or self.builder, result.notes)
        return result

    async def _compress_core(self, core: str, client: LLMClient | None, notes: list[str]) -> str:
        if client is not None:
            prompt = prompts.core_compress_prompt(core, self.core_compress_target)

            def validate(text: str) -> str:
                obj = extract_json(text)
                content = obj.get("content") if isinstance(obj, dict) else None
                if not isinstance(content, str) or not content.strip():
                    raise ValueError("compression output has no 'content'")
                return content.strip()

            try:
                core, _ = await client.chat_json(prompt, validate)
                notes.append("core compressed")
            except LLMCallError as exc:
                notes.append(f"core compression failed ({exc.reason}); hard-capped")
        return core[: self.core_char_limit]

    # ------------------------------------------------------------------ answer
    async def retrieve(self, question: str, k: int | None = None, *,
                       query_vector: np.ndarray | None = None) -> list[Retrieved]:
        k = self.answer_top_k if k is None else k
        if query_vector is not None:
            return await self.search_vector(query_vector, k)
        return await self.search(question, k)

    async def answer(self, question: str, client: LLMClient, *, current_time: str | None = None,
                     k: int | None = None, retrieved: list[Retrieved] | None = None) -> AnswerResult:
        """Top-k entries of any type plus the whole core block -> one answer (LLMCallError propagates).

        `retrieved`: the result of `retrieve(question, k)` when the caller already has it."""
        if retrieved is None:
            retrieved = await self.retrieve(question, k)
        prompt = prompts.answer_prompt(question, self.state.core, [(r.entry.type, r.entry.text) for r in retrieved],
                                       current_time)
        res = await client.chat(prompt, json_mode=False)
        return AnswerResult(answer=res.text.strip(), retrieved=retrieved, core=self.state.core, model=res.model,
                            latency_s=res.latency_s, finish_reason=res.finish_reason)

    # ------------------------------------------------------------------ persistence
    def fork(self) -> "MemorySystem":
        """A copy that shares this system's vectors read-only; what it adds stays its own (and is never saved)."""
        other = MemorySystem.__new__(MemorySystem)
        other.__dict__.update(self.__dict__)
        other.state = self.state.copy()
        other.index = VectorIndex(parent=self.index)
        other.meta = copy.deepcopy(self.meta)
        other._saved, other._unsaved_vectors = None, []
        return other

    def _snapshot_meta(self, log_seq: int) -> dict:
        return {**self.meta, "embedding_model": self.embedder.settings.embedding_model,
                "embedding_dim": self.index.dim, "n_indexed": self.index.ntotal, "log_seq": log_seq}

    def _mark_saved(self, log_seq: int) -> None:
        self._saved = {"n": len(self.state.entries), "core": self.state.core, "meta": copy.deepcopy(self.meta),
                       "seq": log_seq}
        self._unsaved_vectors = []

    def save(self, directory: str | os.PathLike) -> None:
        """The whole memory (a compaction): index first, then memory.json, then the session log is dropped. A crash
        between the two writes leaves extra vectors that load() drops, or a log the snapshot covers."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        seq = self._saved["seq"] if self._saved else int(self.meta.get("log_seq") or 0)
        self.index.save(directory / INDEX_FILE)
        atomic_write_text(directory / MEMORY_FILE, json.dumps({**self.state.to_dict(), "meta": self._snapshot_meta(seq)},
                                                              ensure_ascii=False, indent=1))
        SessionLog(directory).clear()
        self._mark_saved(seq)

    def persist(self, directory: str | os.PathLike) -> None:
        """Save what changed since the last save, at a cost proportional to it: one record appended to the
        folder's session log (and the new entries' vectors). The first save of a folder writes it whole."""
        directory = Path(directory)
        if self._saved is None or not self.exists(directory) or getattr(self, "_needs_reembed", False):
            self.save(directory)
            return
        saved = self._saved
        new_entries = self.state.entries[saved["n"]:]
        vectors = np.vstack(self._unsaved_vectors) if self._unsaved_vectors else None
        if len(new_entries) != (0 if vectors is None else len(vectors)):
            self.save(directory)  # vectors and entries out of step (a re-embed): write the whole memory
            return
        delta: dict[str, Any] = {}
        old_meta, meta = saved["meta"], self.meta
        done_old = list(old_meta.get("sessions_done") or [])
        done_new = list(meta.get("sessions_done") or [])
        if done_new[: len(done_old)] != done_old:
            self.save(directory)
            return
        if len(done_new) > len(done_old):
            delta["sessions_done+"] = done_new[len(done_old):]
        fails_old, fails_new = old_meta.get("session_failures") or {}, meta.get("session_failures") or {}
        added = {k: v for k, v in fails_new.items() if fails_old.get(k) != v}
        if added:
            delta["session_failures+"] = added
        for k, v in meta.items():
            if k not in ("sessions_done", "session_failures") and old_meta.get(k) != v:
                delta.setdefault("set", {})[k] = v
        gone = [k for k in old_meta if k not in meta]
        if gone:
            delta["unset"] = gone
        seq = saved["seq"] + 1
        record = {"seq": seq, "first_entry": saved["n"], "entries": [e.to_dict() for e in new_entries],
                  "dim": self.index.dim, "meta": delta}
        if self.state.core != saved["core"]:
            record["core"] = self.state.core
        SessionLog(directory).append(record, vectors)
        self._mark_saved(seq)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        return (Path(directory) / MEMORY_FILE).is_file()

    @classmethod
    def load(cls, directory: str | os.PathLike, builder: LLMClient | None, *, embedder: LLMClient | None = None,
             **kwargs: Any) -> "MemorySystem":
        directory = Path(directory)
        ms = cls(builder, embedder=embedder, **kwargs)
        mem_path = directory / MEMORY_FILE
        data = read_memory_file(mem_path)  # shape-checked; MemoryStoreError names the file and how to recover
        try:
            ms.state = MemoryState.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise MemoryStoreError(f"unreadable memory file {mem_path}: {exc}: delete {directory} to rebuild it") \
                from None
        ms.meta = {"sessions_done": [], "session_failures": {}, **(data.get("meta") or {})}
        seq = int(ms.meta.get("log_seq") or 0)
        n_snapshot = len(ms.state.entries)
        index_path = directory / INDEX_FILE
        stored_model = ms.meta.get("embedding_model")
        current_model = ms.embedder.settings.embedding_model
        if index_path.is_file() and (stored_model in (None, current_model)):
            ms.index = VectorIndex.load(index_path)
            ms.index.truncate(n_snapshot)
            if ms.index.ntotal < n_snapshot:
                raise MemoryStoreError(f"{index_path} holds {ms.index.ntotal} vectors for {n_snapshot} "
                                       f"entries: delete {directory} to rebuild that memory")
        else:
            ms._needs_reembed = True
            if stored_model and stored_model != current_model:
                log.warning("memory at %s was embedded with %s; re-embedding its %d entries with %s", directory,
                            stored_model, len(ms.state.entries), current_model)
        log_records, vectors = SessionLog(directory).read(seq, n_snapshot)
        for rec in log_records:
            try:
                ms.state.entries.extend(MemoryEntry.from_dict(e) for e in rec.get("entries") or [])
            except (KeyError, TypeError, ValueError) as exc:
                raise MemoryStoreError(f"{directory / 'log.jsonl'} holds a bad entry ({exc}): delete {directory} "
                                       "to rebuild that memory") from None
            if isinstance(rec.get("core"), str):
                ms.state.core = rec["core"]
            delta = rec.get("meta") or {}
            ms.meta["sessions_done"] = list(ms.meta.get("sessions_done") or []) + list(delta.get("sessions_done+") or [])
            ms.meta["session_failures"] = {**(ms.meta.get("session_failures") or {}),
                                           **(delta.get("session_failures+") or {})}
            ms.meta.update(delta.get("set") or {})
            for k in delta.get("unset") or []:
                ms.meta.pop(k, None)
            seq = rec["seq"]
        if len(vectors) and not getattr(ms, "_needs_reembed", False):
            ms.index.add(vectors)
        for k in ("embedding_dim", "n_indexed", "log_seq"):  # snapshot facts, rewritten by the next compaction
            ms.meta.pop(k, None)
        ms._mark_saved(seq)
        return ms

    async def ensure_index(self) -> None:
        """Re-embed every entry when the stored vectors are missing or from another embedding model."""
        if getattr(self, "_needs_reembed", False):
            self.index = VectorIndex()
            if self.state.entries:
                self.index.add(await self.embedder.embed([e.tagged() for e in self.state.entries],
                                                         task="embed.entries"))
            self._needs_reembed = False
            self._unsaved_vectors = []
            self._saved = None  # the next save writes the whole memory with the new vectors


def dominant_type(counts: dict[str, int]) -> str | None:
    """The most retrieved entry type; ties go episodic, semantic, procedural; None when nothing was retrieved."""
    best, best_n = None, 0
    for t in TYPE_PRIORITY:
        n = counts.get(t, 0)
        if n > best_n:
            best, best_n = t, n
    return best
