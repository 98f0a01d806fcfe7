"""The reward server: FastAPI on uvicorn, one process, async all through.

    python -m training.reward_server.server --state-root expert_trajectories --port 8765 \
        [--token T] [--provider openai --model gpt-4.1-mini] [--judge-model gpt-4.1] [--max-in-flight 32]

Endpoints (protocol: docs/interfaces.md, "Reward server"):
  GET  /health          liveness; the models in use only with the token (when one is configured)
  POST /build_and_qa    score one joint rollout whose four agents' outputs the client already holds
                        (compatible with the paper's release: `memory_actions`, `qa_pairs`/`qa_questions`,
                        `state_before_path` are accepted as aliases)
  POST /joint_rollout   submit ONE agent's sample; the server joins the k-th sample of each agent of a session group
                        into a joint rollout (expert fallback after a timeout) and answers when it has been scored
  GET  /stats           counters, LLM usage and failures, state cache, memory

Error contract (both endpoints): 401/403 token, 404 no state, 413 body too large, 422 `reason` for any malformed
request or unreadable state, 503 `retryable: true` only for transient upstream trouble (an LLM call that still failed
after retries, shutting down), 500 `retryable: false` for a bug. Every error is a JSON body with `reason`; nothing
escapes to uvicorn, so keep-alive connections stay usable (413 closes the connection, as its body is left unread).

The server must run as a single process (the rendezvous lives in memory): never start it with several workers.
On startup it prints `READY http://HOST:PORT` on stdout. SIGTERM scores the open joint rollouts with the expert
fallback, answers whatever is still running 503 retryable after a grace period, and exits within 10 s.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import resource
import sys
import time
from typing import Any, Awaitable, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import config
from llm_client import AVAILABLE_PROVIDERS, add_call_budget_args
from memory_system import AGENTS
from training.reward_server.engine import (EngineSettings, JointError, JointRendezvous, JointSample, RequestError,
                                           RewardEngine, SparseOptions, TaskRequest, UpstreamError, run_cpu,
                                           validate_outputs)

log = logging.getLogger("reward_server")
TOKEN_ENV = "REWARD_SERVER_TOKEN"
DEFAULT_MAX_BODY_BYTES = 8 * 2 ** 20
DEFAULT_MAX_QA_PAIRS = 64
MAX_TEXT_CHARS = 16384  # a question, a gold answer, a type or source label
MAX_ID_CHARS = 512  # session group ids, session ids, times
SHUTDOWN_GRACE_S = 6.0  # SIGTERM: how long running work may finish before it is answered 503 retryable


# --------------------------------------------------------------------------- request models

class QAPairIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    answer: str = Field(max_length=MAX_TEXT_CHARS)
    type: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    source: str | None = Field(default=None, max_length=MAX_ID_CHARS)

    @field_validator("answer", mode="before")
    @classmethod
    def _gold_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _normalise_actions(v: Any) -> dict[str, Any]:
    """{agent: raw output} from a mapping, or from the release's list of {"agent_type", "action"} items."""
    if isinstance(v, list):
        out: dict[str, Any] = {}
        for i, item in enumerate(v[:len(AGENTS) + 1]):
            if not isinstance(item, dict) or "agent_type" not in item:
                raise ValueError(f"item {i} must be an object with 'agent_type' and 'action'")
            agent = item["agent_type"]
            if not isinstance(agent, str):
                raise ValueError(f"item {i}: 'agent_type' must be a string")
            if agent in out:
                raise ValueError(f"agent {agent[:40]!r} appears more than once")
            out[agent] = item.get("action")
        if len(v) > len(AGENTS):
            raise ValueError(f"more than {len(AGENTS)} items")
        v = out
    if not isinstance(v, dict):
        raise ValueError("must be an object {agent: output} or a list of {agent_type, action}")
    unknown = sorted(str(k)[:40] for k in v if k not in AGENTS)
    if unknown:
        raise ValueError(f"unknown agent(s) {', '.join(unknown[:5])} (expected {', '.join(AGENTS)})")
    return dict(v)


_Id = Field(min_length=1, max_length=MAX_ID_CHARS)


class BuildAndQARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_group_id: str = Field(default="unknown", min_length=1, max_length=MAX_ID_CHARS)
    state_path: str | None = Field(default=None, max_length=8192,
                                   validation_alias=AliasChoices("state_path", "state_before_path"))
    actions: dict[str, Any] = Field(validation_alias=AliasChoices("actions", "memory_actions", "agents_actions"))
    qa_pairs: list[QAPairIn] = Field(validation_alias=AliasChoices("qa_pairs", "qa_questions"))
    current_time: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    session_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)

    @field_validator("actions", mode="before")
    @classmethod
    def _actions(cls, v: Any) -> dict[str, Any]:
        return _normalise_actions(v)


class SparseIn(BaseModel):
    drop_rate: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int = 42
    default_reward: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)


class JointRolloutRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_group_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    agent: Literal["core", "episodic", "semantic", "procedural"]
    output: Any = Field(validation_alias=AliasChoices("output", "solution_str", "response"))
    state_path: str | None = Field(default=None, max_length=8192,
                                   validation_alias=AliasChoices("state_path", "state_before_path"))
    qa_pairs: list[QAPairIn]
    expert_outputs: dict[str, Any] = Field(default_factory=dict)
    current_time: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    sample_key: str | None = Field(default=None, max_length=200)
    timeout_s: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    sparse: SparseIn | None = None

    @field_validator("expert_outputs", mode="before")
    @classmethod
    def _experts(cls, v: Any) -> Any:
        return {} if v is None else _normalise_actions(v)


# --------------------------------------------------------------------------- errors and body reading

class ApiError(Exception):
    def __init__(self, status: int, reason: str, *, retryable: bool | None = None, close: bool = False,
                 headers: dict | None = None, detail: Any = None):
        super().__init__(reason)
        self.status, self.reason, self.retryable, self.close = status, reason, retryable, close
        self.headers = headers or {}
        self.detail = detail


def error_response(status: int, reason: str, *, retryable: bool | None = None, close: bool = False,
                   headers: dict | None = None, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": reason if detail is None else detail, "reason": reason}
    if retryable is not None or status >= 500:
        body["retryable"] = bool(retryable)
    h = dict(headers or {})
    if close:
        h["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=h)


def _validation_reason(exc: ValidationError) -> tuple[str, list[dict]]:
    errors = []
    for e in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        errors.append({"loc": loc[:200], "msg": str(e.get("msg", ""))[:300], "type": str(e.get("type", ""))})
    shown = errors[:5]
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(f"{e['loc']}: {e['msg']}" for e in shown) + more or "malformed request", errors[:50]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes: from Content-Length before reading
    anything, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", close=True) from None
        if n > limit:
            raise ApiError(413, f"body of {n} bytes is over the limit of {limit}", close=True)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes", close=True)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(body: bytes, model: type[BaseModel], max_qa_pairs: int) -> BaseModel:
    """UTF-8 -> JSON -> the request model; 422 with a reason for whatever fails. CPU-bound: run in a thread."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, f"body is not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(422, "body is JSON nested too deeply") from None
    except ValueError as exc:
        raise ApiError(422, f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "body must be a JSON object")
    qa = data.get("qa_pairs", data.get("qa_questions"))
    if isinstance(qa, list) and len(qa) > max_qa_pairs:
        raise ApiError(422, f"qa_pairs: {len(qa)} QA pairs, over the cap of {max_qa_pairs} a request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        reason, errors = _validation_reason(exc)
        raise ApiError(422, reason, detail=errors) from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise ApiError(422, f"malformed request: {type(exc).__name__}") from None


def memory_stats() -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rss = None
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_mb": round(rss, 1) if rss is not None else None, "peak_rss_mb": round(peak_kb / 1024, 1)}


class ClientGone(Exception):
    """The client disconnected while its request was being worked on."""


# --------------------------------------------------------------------------- app

def create_app(engine: RewardEngine, *, token: str | None = None, rendezvous: JointRendezvous | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> FastAPI:
    rdv = rendezvous or JointRendezvous(engine.build_and_qa, default_timeout_s=engine.settings.rendezvous_timeout_s,
                                        max_timeout_s=engine.settings.max_rendezvous_timeout_s)
    app = FastAPI(title="MemBuilder reward server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.rendezvous = engine, rdv
    started = time.time()
    stopping = asyncio.Event()
    max_qa = engine.settings.max_qa_pairs
    counters = {"errors": {}, "disconnects": 0}

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        value = request.headers.get("authorization") or ""
        scheme, _, cred = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), token.encode())

    def require_token(request: Request) -> None:
        """Checked before a byte of the body is read; an unread body that is not small closes the connection."""
        if token is None:
            return
        declared = (request.headers.get("content-length") or "0").strip()
        chunked = "chunked" in (request.headers.get("transfer-encoding") or "").lower()
        close = chunked or not declared.isdigit() or int(declared) > 65536
        value = request.headers.get("authorization")
        if not value:
            raise ApiError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}, close=close)
        if not authorised(request):
            raise ApiError(403, "invalid bearer token", close=close)

    async def until_disconnect(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def cancellable(request: Request, work: Awaitable[Any], *, grace_s: float | None = None) -> Any:
        """Run `work` until it finishes, the client goes away (the work is cancelled: its LLM calls stop), or the
        server is stopping and `grace_s` has passed."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(until_disconnect(request))
        stop = asyncio.ensure_future(_stop_after_grace(grace_s)) if grace_s is not None else None
        try:
            waits = {task, watcher} | ({stop} if stop else set())
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            if watcher in done:
                counters["disconnects"] += 1
                raise ClientGone()
            raise ApiError(503, "the reward server is shutting down", retryable=True, close=True)
        finally:
            for t in (task, watcher, stop):
                if t is not None and not t.done():
                    t.cancel()

    async def _stop_after_grace(grace_s: float) -> None:
        await stopping.wait()
        await asyncio.sleep(grace_s)

    async def guarded(request: Request, handler: Callable[[Request], Awaitable[Any]]) -> Any:
        """Every outcome of a request as a JSON response: nothing reaches uvicorn as an exception."""
        try:
            # Serialised here, inside the guard: a value JSON cannot hold fails this request, not the connection.
            return JSONResponse(await handler(request))
        except ApiError as exc:
            err = exc
        except RequestError as exc:
            err = ApiError(exc.status, exc.reason)
        except UpstreamError as exc:
            err = ApiError(503, exc.reason, retryable=True)
        except JointError as exc:
            err = ApiError(exc.status, exc.reason, retryable=exc.retryable if exc.status >= 500 else None)
        except ClientGone:
            return error_response(499, "client closed the request", close=True)  # nobody reads it
        except ClientDisconnect:  # gone while its body was being read
            counters["disconnects"] += 1
            return error_response(499, "client closed the request", close=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: say so, keep serving
            log.exception("unhandled error on %s", request.url.path)
            err = ApiError(500, f"internal error: {type(exc).__name__}", retryable=False)
        counters["errors"][err.status] = counters["errors"].get(err.status, 0) + 1
        return error_response(err.status, err.reason, retryable=err.retryable, close=err.close, headers=err.headers,
                              detail=err.detail)

    async def request_model(request: Request, model: type[BaseModel]) -> Any:
        require_token(request)
        body = await read_body(request, max_body_bytes)
        return await run_cpu(parse_body, body, model, max_qa)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Routing errors (an unknown path, a wrong method) in the same JSON shape as every other error.
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health(request: Request):
        base = {"status": "stopping" if stopping.is_set() else "ok"}
        if not authorised(request):
            return base
        return {**base, "uptime_s": round(time.time() - started, 1), **engine.describe(),
                "endpoints": ["/build_and_qa", "/joint_rollout", "/stats"]}

    @app.get("/stats")
    async def stats(request: Request):
        async def handler(request: Request):
            require_token(request)
            return {"engine": engine.stats(), "rendezvous": rdv.stats(), "memory": memory_stats(),
                    "http": {"errors": {str(k): v for k, v in sorted(counters["errors"].items())},
                             "disconnects": counters["disconnects"]}}
        return await guarded(request, handler)

    async def _build_and_qa(request: Request):
        req = await request_model(request, BuildAndQARequest)
        task = TaskRequest(req.session_group_id, req.state_path, req.actions,
                           [q.model_dump() for q in req.qa_pairs], current_time=req.current_time,
                           session_id=req.session_id)
        if stopping.is_set():
            raise ApiError(503, "the reward server is shutting down", retryable=True, close=True)
        result = await cancellable(request, engine.build_and_qa(task), grace_s=shutdown_grace_s)
        return result.to_dict()

    async def _joint_rollout(request: Request):
        req = await request_model(request, JointRolloutRequest)
        await asyncio.to_thread(engine.states.resolve, req.state_path)  # refuse a bad path now, not after waiting
        output = "" if req.output is None else req.output
        qa = [q.model_dump() for q in req.qa_pairs]
        engine.check_request(TaskRequest(req.session_group_id, req.state_path, {}, qa))
        try:
            sparse = SparseOptions(**req.sparse.model_dump()) if req.sparse else None
        except ValueError as exc:
            raise ApiError(422, f"sparse: {exc}") from None
        sample = JointSample(req.session_group_id, req.agent, output, req.state_path, qa, dict(req.expert_outputs),
                             current_time=req.current_time, sample_key=req.sample_key, timeout_s=req.timeout_s,
                             sparse=sparse)
        own = (await run_cpu(validate_outputs, {req.agent: output}))[1][req.agent]
        # No grace here: on shutdown the rendezvous itself resolves every slot.
        outcome = await cancellable(request, rdv.submit(sample))
        return {**outcome.to_dict(), "agent": req.agent, "sample_key": sample.sample_key,
                "own_status": own.status, "own_reason": own.reason}

    @app.post("/build_and_qa")
    async def build_and_qa(request: Request):
        return await guarded(request, _build_and_qa)

    @app.post("/joint_rollout")
    async def joint_rollout(request: Request):
        return await guarded(request, _joint_rollout)

    async def begin_shutdown() -> None:
        """SIGTERM: refuse new work, score open slots with the expert fallback, cancel what outlives the grace."""
        if stopping.is_set():
            return
        stopping.set()
        log.info("shutting down: %d open joint rollouts, %d being scored", rdv.open_slots(), rdv.running())
        await rdv.shutdown(shutdown_grace_s)

    app.state.begin_shutdown = begin_shutdown
    return app


# --------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.reward_server.server",
                description="MemBuilder reward server: build memory from a joint rollout, answer and judge its QAs.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=config.REWARD_SERVER_PORT, help="port (0: any free port)")
    p.add_argument("--state-root", default=os.environ.get("MEMBUILDER_STATE_ROOT") or ".",
                   help="state paths are confined to this folder; relative ones are resolved against it")
    p.add_argument("--token", default=None, help=f"bearer token required on every request (default ${TOKEN_ENV})")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="allow a non-loopback --host without a token (anyone who reaches it spends your LLM budget)")
    p.add_argument("--provider", choices=AVAILABLE_PROVIDERS, default="openai", help="answer-model provider")
    p.add_argument("--model", default=config.ANSWER_MODEL, help=f"answer model (default {config.ANSWER_MODEL})")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="API key (default $OPENAI_API_KEY)")
    p.add_argument("--judge-provider", choices=AVAILABLE_PROVIDERS, default=None,
                   help="judge provider (default --provider; openai when --provider is vllm)")
    p.add_argument("--judge-model", default=config.JUDGE_MODEL, help=f"judge model (default {config.JUDGE_MODEL})")
    p.add_argument("--judge-base-url", default=None, help="judge base URL (default --base-url, same provider)")
    p.add_argument("--judge-api-key", default=None, help="judge API key (default --api-key, same provider)")
    p.add_argument("--embedding-provider", choices=("openai", "offline"), default=None,
                   help="embeddings (default: offline for the offline provider, else openai); must match the "
                        "embeddings the expert states were saved with, or they are re-embedded on load")
    p.add_argument("--embedding-model", default=None, help=f"embedding model (default {config.EMBEDDING_MODEL})")
    p.add_argument("--embedding-base-url", default=None,
                   help="embeddings base URL (default $OPENAI_EMBEDDINGS_BASE_URL)")
    p.add_argument("--embedding-api-key", default=None)
    p.add_argument("--max-in-flight", type=int, default=config.DEFAULT_MAX_IN_FLIGHT,
                   help="bound on LLM requests in flight, all kinds together")
    add_call_budget_args(p, ("answer", "judge", "compress"))
    p.add_argument("--top-k", type=int, default=config.QA_ANSWERING_TOP_K, help="entries retrieved per question")
    p.add_argument("--state-cache-size", type=int, default=32, help="loaded states kept (LRU)")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0,
                   help="seconds a joint rollout waits for its four agents before the expert fills in "
                        "(a request may ask for less)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--max-qa-pairs", type=int, default=DEFAULT_MAX_QA_PAIRS,
                   help=f"most QA pairs a request may carry; more get 422 (default {DEFAULT_MAX_QA_PAIRS})")
    p.add_argument("--cache-dir", default=None, help="on-disk LLM response cache (default $MEMBUILDER_CACHE_DIR)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        state_root=args.state_root, provider=args.provider, model=args.model, base_url=args.base_url,
        api_key=args.api_key, judge_provider=args.judge_provider, judge_model=args.judge_model,
        judge_base_url=args.judge_base_url, judge_api_key=args.judge_api_key,
        embedding_provider=args.embedding_provider, embedding_model=args.embedding_model,
        embedding_base_url=args.embedding_base_url, embedding_api_key=args.embedding_api_key,
        max_in_flight=args.max_in_flight, max_retries=args.max_retries, timeout_s=args.request_timeout,
        call_deadline_s=args.call_deadline, max_tokens_answer=args.max_tokens_answer,
        max_tokens_judge=args.max_tokens_judge, max_tokens_compress=args.max_tokens_compress,
        json_schema=args.json_schema, client_processes=args.client_processes,
        answer_top_k=args.top_k, state_cache_size=args.state_cache_size,
        rendezvous_timeout_s=args.rendezvous_timeout, cache_dir=args.cache_dir, max_qa_pairs=args.max_qa_pairs)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_server(cfg, app: FastAPI):
    """uvicorn's server, with SIGTERM/SIGINT also starting the app's own shutdown (open joint rollouts scored with
    the expert fallback, running work answered 503 retryable after the grace period) while uvicorn drains."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            loop = getattr(self, "loop", None)
            if first and loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(app.state.begin_shutdown()))

    return _Server(cfg)


async def _serve(server, host: str) -> None:
    server.loop = asyncio.get_running_loop()
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # re-raise a bind error
            raise SystemExit(2)
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"READY http://{host}:{port}", flush=True)
    await task


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
    # A worker thread parsing a hostile output holds the GIL up to the switch interval each time the event loop
    # wants it; 1 ms instead of 5 keeps /health and the other requests' I/O prompt.
    sys.setswitchinterval(0.001)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not os.path.isdir(args.state_root):
        return _fail(f"--state-root {args.state_root!r} is not a folder")
    if args.max_in_flight < 1:
        return _fail("--max-in-flight must be at least 1")
    if args.max_body_bytes < 1024:
        return _fail("--max-body-bytes must be at least 1024")
    if token is None and not _is_loopback(args.host) and not args.insecure_no_token:
        return _fail(f"--host {args.host} is not a loopback address and no token is set (--token or "
                     f"${TOKEN_ENV}); pass --insecure-no-token to serve it open anyway")
    try:
        engine = RewardEngine(settings_from_args(args))
    except ValueError as exc:
        return _fail(str(exc))
    if token is None and not _is_loopback(args.host):
        log.warning("binding %s without a token (--insecure-no-token): anyone who can reach it may spend your LLM "
                    "budget", args.host)
    app = create_app(engine, token=token, max_body_bytes=args.max_body_bytes)
    log.info("reward server: %s", engine.describe())
    cfg = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                         backlog=4096, timeout_keep_alive=75, workers=1,
                         timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 2.0)
    try:
        asyncio.run(_serve(_uvicorn_server(cfg, app), args.host))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
