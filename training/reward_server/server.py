"""The reward server: FastAPI on uvicorn, one process, async all through.

    python -m training.reward_server.server --state-root expert_trajectories --port 8765 \
        [--token T] [--provider openai --model gpt-4.1-mini] [--judge-model gpt-4.1] [--max-in-flight 32]

Endpoints (protocol: docs/interfaces.md, "Reward server"):
  GET  /health          liveness, the models in use (no token needed)
  POST /build_and_qa    score one joint rollout whose four agents' outputs the client already holds
                        (compatible with the paper's release: `memory_actions`, `qa_pairs`/`qa_questions`,
                        `state_before_path` are accepted as aliases)
  POST /joint_rollout   submit ONE agent's sample; the server joins the k-th sample of each agent of a session group
                        into a joint rollout (expert fallback after a timeout) and answers when it has been scored
  GET  /stats           counters, LLM usage, state cache, memory

The server must run as a single process (the rendezvous lives in memory): never start it with several workers.
On startup it prints `READY http://HOST:PORT` on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import resource
import sys
import time
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

import config
from llm_client import AVAILABLE_PROVIDERS
from memory_system import AGENTS
from training.reward_server.engine import (EngineSettings, JointRendezvous, JointSample, RewardEngine, SparseOptions,
                                           StatePathError, TaskRequest, validate_outputs)

log = logging.getLogger("reward_server")
TOKEN_ENV = "REWARD_SERVER_TOKEN"


# --------------------------------------------------------------------------- request models

class QAPairIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    question: str = Field(min_length=1)
    answer: str
    type: str | None = None
    source: str | None = None

    @field_validator("answer", mode="before")
    @classmethod
    def _gold_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _normalise_actions(v: Any) -> dict[str, Any]:
    """{agent: raw output} from a mapping, or from the release's list of {"agent_type", "action"} items."""
    if isinstance(v, list):
        out: dict[str, Any] = {}
        for i, item in enumerate(v):
            if not isinstance(item, dict) or "agent_type" not in item:
                raise ValueError(f"item {i} must be an object with 'agent_type' and 'action'")
            agent = item["agent_type"]
            if agent in out:
                raise ValueError(f"agent {agent!r} appears more than once")
            out[agent] = item.get("action")
        v = out
    if not isinstance(v, dict):
        raise ValueError("must be an object {agent: output} or a list of {agent_type, action}")
    unknown = sorted(str(k) for k in v if k not in AGENTS)
    if unknown:
        raise ValueError(f"unknown agent(s) {', '.join(unknown)} (expected {', '.join(AGENTS)})")
    return dict(v)


class BuildAndQARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_group_id: str = Field(default="unknown", min_length=1)
    state_path: str | None = Field(default=None, validation_alias=AliasChoices("state_path", "state_before_path"))
    actions: dict[str, Any] = Field(validation_alias=AliasChoices("actions", "memory_actions", "agents_actions"))
    qa_pairs: list[QAPairIn] = Field(validation_alias=AliasChoices("qa_pairs", "qa_questions"))
    current_time: str | None = None
    session_id: str | None = None

    @field_validator("actions", mode="before")
    @classmethod
    def _actions(cls, v: Any) -> dict[str, Any]:
        return _normalise_actions(v)


class SparseIn(BaseModel):
    drop_rate: float = Field(ge=0.0, le=1.0)
    seed: int = 42
    default_reward: float = 1.0


class JointRolloutRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_group_id: str = Field(min_length=1)
    agent: Literal["core", "episodic", "semantic", "procedural"]
    output: Any = Field(validation_alias=AliasChoices("output", "solution_str", "response"))
    state_path: str | None = Field(default=None, validation_alias=AliasChoices("state_path", "state_before_path"))
    qa_pairs: list[QAPairIn]
    expert_outputs: dict[str, Any] = Field(default_factory=dict)
    current_time: str | None = None
    sample_key: str | None = Field(default=None, max_length=200)
    timeout_s: float | None = Field(default=None, ge=0.0)
    sparse: SparseIn | None = None

    @field_validator("expert_outputs", mode="before")
    @classmethod
    def _experts(cls, v: Any) -> Any:
        return {} if v is None else _normalise_actions(v)


# --------------------------------------------------------------------------- app

def _reason(exc: RequestValidationError) -> tuple[str, list[dict]]:
    errors = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        errors.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "malformed request", errors


def memory_stats() -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rss = None
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_mb": round(rss, 1) if rss is not None else None, "peak_rss_mb": round(peak_kb / 1024, 1)}


def create_app(engine: RewardEngine, *, token: str | None = None,
               rendezvous: JointRendezvous | None = None) -> FastAPI:
    rdv = rendezvous or JointRendezvous(engine.build_and_qa, default_timeout_s=engine.settings.rendezvous_timeout_s,
                                        max_timeout_s=engine.settings.max_rendezvous_timeout_s)
    app = FastAPI(title="MemBuilder reward server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.rendezvous = engine, rdv
    started = time.time()

    async def require_token(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        if not authorization:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(403, "invalid bearer token")

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError):
        reason, errors = _reason(exc)
        return JSONResponse({"detail": errors, "reason": reason}, status_code=422)

    @app.exception_handler(StatePathError)
    async def _bad_state(request: Request, exc: StatePathError):
        return JSONResponse({"detail": exc.reason, "reason": exc.reason}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail, "reason": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # A bug, not an upstream failure (those are recorded per question): say so without a bare 500.
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}", "reason": "internal error",
                             "retryable": True}, status_code=503)

    @app.get("/health")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), **engine.describe(),
                "endpoints": ["/build_and_qa", "/joint_rollout", "/stats"]}

    @app.get("/stats", dependencies=[Depends(require_token)])
    async def stats():
        return {"engine": engine.stats(), "rendezvous": rdv.stats(), "memory": memory_stats()}

    @app.post("/build_and_qa", dependencies=[Depends(require_token)])
    async def build_and_qa(req: BuildAndQARequest):
        task = TaskRequest(req.session_group_id, req.state_path, req.actions,
                           [q.model_dump() for q in req.qa_pairs], current_time=req.current_time,
                           session_id=req.session_id)
        result = await engine.build_and_qa(task)
        return result.to_dict()

    @app.post("/joint_rollout", dependencies=[Depends(require_token)])
    async def joint_rollout(req: JointRolloutRequest):
        engine.states.resolve(req.state_path)  # refuse a bad path now, not after the rendezvous
        output = "" if req.output is None else req.output
        sample = JointSample(req.session_group_id, req.agent, output, req.state_path,
                             [q.model_dump() for q in req.qa_pairs], dict(req.expert_outputs),
                             current_time=req.current_time, sample_key=req.sample_key, timeout_s=req.timeout_s,
                             sparse=SparseOptions(**req.sparse.model_dump()) if req.sparse else None)
        outcome = await rdv.submit(sample)
        own = validate_outputs({req.agent: output})[1][req.agent]
        return {**outcome.to_dict(), "agent": req.agent, "sample_key": sample.sample_key,
                "own_status": own.status, "own_reason": own.reason}

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
    p.add_argument("--max-retries", type=int, default=config.DEFAULT_MAX_RETRIES, help="retries per LLM request")
    p.add_argument("--request-timeout", type=float, default=config.DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds per LLM request")
    p.add_argument("--top-k", type=int, default=config.QA_ANSWERING_TOP_K, help="entries retrieved per question")
    p.add_argument("--state-cache-size", type=int, default=32, help="loaded states kept (LRU)")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0,
                   help="seconds a joint rollout waits for its four agents before the expert fills in "
                        "(a request may ask for less)")
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
        answer_top_k=args.top_k, state_cache_size=args.state_cache_size,
        rendezvous_timeout_s=args.rendezvous_timeout, cache_dir=args.cache_dir)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(server, host: str) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # re-raise a bind error
            raise SystemExit(2)
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"READY http://{host}:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not os.path.isdir(args.state_root):
        print(f"error: --state-root {args.state_root!r} is not a folder", file=sys.stderr)
        return 2
    if args.max_in_flight < 1:
        print("error: --max-in-flight must be at least 1", file=sys.stderr)
        return 2
    try:
        engine = RewardEngine(settings_from_args(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if token is None and not _is_loopback(args.host):
        log.warning("binding %s without a token: anyone who can reach it may spend your LLM budget", args.host)
    app = create_app(engine, token=token)
    log.info("reward server: %s", engine.describe())
    cfg = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                         backlog=4096, timeout_keep_alive=75, workers=1)
    try:
        asyncio.run(_serve(uvicorn.Server(cfg), args.host))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
