"""A scripted OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

uvicorn serving `/v1/chat/completions` and `/v1/embeddings` (plain Starlette handlers, cheap per
request) and `/v1/models` (FastAPI). A responder
`fn(task, body) -> str` scripts each completion's content (the task comes from the `X-MemBuilder-Task` header
our client sends); latency and faults (HTTP 500, HTTP 429, malformed JSON content) are injected with a seeded
generator; every request is logged so tests can assert on what was sent and answered. An outage can be scripted:
`unavailable(seconds)` (or `POST /_control/unavailable?seconds=S`) answers every request HTTP 503 for that long; to
take it away entirely, run it as a process and kill it (restart it on the same `--port`).

In process:   with ScriptedServer(latency_s=0.1) as srv: client = LLMClient(provider="openai", base_url=srv.base_url)
As a process: python -m scripts.scripted_server --latency 0.1 --fail-500 0.1 --port 0   (prints "READY <base_url>")
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import re
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

Responder = Callable[[str, dict], str]
TASK_HEADER = "x-membuilder-task"


def _user_text(body: dict) -> str:
    return "\n".join(m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user")


def _session_lines(body: dict) -> list[str]:
    text = _user_text(body)
    part = text.split("one message per line):\n", 1)
    if len(part) < 2:
        return []
    return [ln for ln in part[1].split("\n\n", 1)[0].splitlines() if ln.strip()]


def _field(body: dict, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}: (.*)$", _user_text(body), re.MULTILINE)
    return m.group(1).strip() if m else ""


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def default_responder(task: str, body: dict) -> str:
    """Valid, deterministic outputs for every task, derived from the request text.

    Agents: core APPENDs a line naming the session's first message; each entry agent ADDs one entry per session
    built from the first message line; the judge says CORRECT for questions whose hash is not divisible by 3.
    """
    lines = _session_lines(body)
    first = lines[0][:120] if lines else "(empty session)"
    if task == "agent.core":
        return json.dumps({"operation": "APPEND", "content": f"profile note: {first}"})
    if task in ("agent.episodic", "agent.semantic", "agent.procedural"):
        kind = task.split(".", 1)[1]
        if kind == "procedural" and stable_hash(first) % 2:
            return json.dumps({"operations": []})
        return json.dumps({"operations": [{"action": "ADD", "memory": f"{kind}: {first}"}]})
    if task == "core.compress":
        core = _user_text(body).split("\n", 1)[-1]
        return json.dumps({"content": core[:2500]})
    if task == "answer":
        return f"scripted answer to: {_field(body, 'Question')[:80]}"
    if task.startswith("judge"):
        label = "WRONG" if stable_hash(_field(body, "Question")) % 3 == 0 else "CORRECT"
        return json.dumps({"label": label})
    if task == "qa.generate":
        qs = [{"question": f"What did I mention about item {i} ({first[:40]})?", "answer": f"answer {i}",
               "type": ["single-session", "single-session", "multi-session", "multi-session", "temporal-reasoning"][i],
               "source": "current_session"} for i in range(5)]
        return json.dumps({"questions": qs})
    return json.dumps({"ok": True})


def grounded_responder(task: str, body: dict) -> str:
    """Like `default_responder`, but answers only from the memories the answer prompt carries (the reply is the
    retrieved block) and judges CORRECT only when the gold answer appears in the reply: the reward then depends on
    what was built and retrieved, as a real one does."""
    text = _user_text(body)
    if task == "answer":
        return text.split("Retrieved memories:", 1)[-1].split("\n\nCurrent date:", 1)[0].strip() or "Not answerable"
    if task.startswith("judge"):
        gold = _field(body, "Gold answer")
        answer = text.split("Answer to grade: ", 1)[-1]
        return json.dumps({"label": "CORRECT" if gold and gold.lower() in answer.lower() else "WRONG"})
    return default_responder(task, body)


RESPONDERS = {"default": default_responder, "grounded": grounded_responder}


def hashed_embedding(text: str, dim: int) -> list[float]:
    vec = np.zeros(dim, dtype=np.float32)
    for tok in re.findall(r"[a-z0-9]+", text.lower()):
        vec[zlib.crc32(tok.encode()) % dim] += 1.0
    n = float(np.linalg.norm(vec))
    if n == 0:
        vec[0] = 1.0
        n = 1.0
    return [round(float(x) / n, 6) for x in vec]


class _FastPaths:
    """ASGI: POST requests to `routes` go to plain `handler(Request) -> Response` functions, the rest to `app`."""

    def __init__(self, app, routes: dict[str, Callable]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send) -> None:
        handler = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        response = await handler(Request(scope, receive))
        await response(scope, receive, send)


async def _json_body(request: Request) -> dict | None:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _b64_floats(vec: list[float]) -> str:
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()


@dataclass
class LoggedRequest:
    endpoint: str
    task: str
    status: int
    t_start: float
    t_end: float
    content: str | None = None
    fault: str | None = None
    body: dict = field(default_factory=dict)


class ScriptedServer:
    def __init__(self, responder: Responder | None = None, *, latency_s: float = 0.0, fail_500: float = 0.0,
                 fail_429: float = 0.0, malformed: float = 0.0, malformed_prefix: str = "agent.",
                 fault_embeddings: bool = True, seed: int = 0, embed_dim: int = 64, host: str = "127.0.0.1",
                 port: int = 0, keep_bodies: bool = True, reject_response_format: bool = False,
                 fail_tasks: dict[str, int] | None = None, raw_reply: Callable | None = None):
        self.responder = responder or default_responder
        # task (X-MemBuilder-Task) -> HTTP status answered to every request of that task, e.g. {"agent.core": 500}
        self.fail_tasks = dict(fail_tasks or {})  # "*" stands for every task
        # raw_reply(task, body) -> a Starlette Response to send instead of a completion (malformed replies), or None
        self.raw_reply = raw_reply
        self.reject_response_format = reject_response_format  # act like a server without JSON mode (HTTP 400)
        self.latency_s = latency_s
        self.fail_500, self.fail_429, self.malformed = fail_500, fail_429, malformed
        self.malformed_prefix = malformed_prefix
        self.fault_embeddings = fault_embeddings
        self.embed_dim = embed_dim
        self.host, self.port = host, port
        self.keep_bodies = keep_bodies
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.log: list[LoggedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = None
        self._thread: threading.Thread | None = None
        self._down_until = 0.0
        self.app = self._make_app()

    # ------------------------------------------------------------------ app
    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _exit(self, rec: LoggedRequest) -> None:
        with self._lock:
            self.in_flight -= 1
            self.log.append(rec)

    def _task_fault(self, task: str) -> str | None:
        code = self.fail_tasks.get(task, self.fail_tasks.get("*"))
        return f"task:{code}" if code else None

    def unavailable(self, seconds: float) -> None:
        """Answer every request HTTP 503 for the next `seconds` (an outage behind a load balancer)."""
        with self._lock:
            self._down_until = time.monotonic() + max(0.0, seconds)

    def _fault(self) -> str | None:
        if time.monotonic() < self._down_until:
            return "503"
        d = self._draw()
        if d < self.fail_500:
            return "500"
        if d < self.fail_500 + self.fail_429:
            return "429"
        return None

    def _make_app(self):
        app = FastAPI()

        def fault_response(kind: str):
            if kind.startswith("task:"):
                code = int(kind.split(":", 1)[1])
                return JSONResponse({"error": {"message": f"scripted failure HTTP {code}", "type": "scripted"}}, code)
            if kind == "503":
                return JSONResponse({"error": {"message": "scripted outage", "type": "unavailable"}}, 503)
            if kind == "500":
                return JSONResponse({"error": {"message": "injected server error", "type": "server_error"}}, 500)
            return JSONResponse({"error": {"message": "injected rate limit", "type": "rate_limit"}}, 429,
                                headers={"retry-after": "0"})

        @app.post("/_control/unavailable")
        async def control_unavailable(seconds: float = 0.0):
            self.unavailable(seconds)
            return {"unavailable_s": seconds}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "tests"}]}

        async def chat(request: Request):
            body = await _json_body(request)
            if body is None:
                return JSONResponse({"error": {"message": "the body is not a JSON object",
                                               "type": "invalid_request_error"}}, 400)
            task = request.headers.get(TASK_HEADER, "unknown")
            t0 = time.perf_counter()
            self._enter()
            rec = LoggedRequest("chat", task, 200, t0, t0, body=body if self.keep_bodies else {})
            try:
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if self.reject_response_format and "response_format" in body:
                    rec.status, rec.fault = 400, "response_format"
                    return JSONResponse({"error": {"message": "response_format is not supported by this server",
                                                   "type": "invalid_request_error"}}, 400)
                fault = self._task_fault(task) or self._fault()
                if fault:
                    rec.status, rec.fault = int(fault.split(":")[-1]), fault
                    return fault_response(fault)
                raw = self.raw_reply(task, body) if self.raw_reply else None
                if raw is not None:
                    rec.fault = "raw"
                    return raw
                content = self.responder(task, body)
                if self.malformed and task.startswith(self.malformed_prefix) and self._draw() < self.malformed:
                    content, rec.fault = content[: max(1, len(content) // 2)] + " <<truncated", "malformed"
                rec.content = content
                ptoks = sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4
                return JSONResponse({
                    "id": f"chatcmpl-{len(self.log)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "scripted"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": ptoks, "completion_tokens": len(content) // 4,
                              "total_tokens": ptoks + len(content) // 4}})
            finally:
                rec.t_end = time.perf_counter()
                self._exit(rec)

        async def embeddings(request: Request):
            body = await _json_body(request)
            if body is None:
                return JSONResponse({"error": {"message": "the body is not a JSON object",
                                               "type": "invalid_request_error"}}, 400)
            inputs = body.get("input", [])
            inputs = [inputs] if isinstance(inputs, str) else inputs
            t0 = time.perf_counter()
            self._enter()
            rec = LoggedRequest("embeddings", request.headers.get(TASK_HEADER, "embed"), 200, t0, t0)
            try:
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                task = rec.task
                fault = self._task_fault(task) or (self._fault() if self.fault_embeddings else None)
                if fault:
                    rec.status, rec.fault = int(fault.split(":")[-1]), fault
                    return fault_response(fault)
                b64 = body.get("encoding_format") == "base64"  # what the SDK asks by default, as OpenAI answers it
                data = [{"object": "embedding", "index": i,
                         "embedding": _b64_floats(v) if b64 else v}
                        for i, v in enumerate(hashed_embedding(str(t), self.embed_dim) for t in inputs)]
                return JSONResponse({"object": "list", "data": data, "model": body.get("model", "scripted-embed"),
                                     "usage": {"prompt_tokens": 0, "total_tokens": 0}})
            finally:
                rec.t_end = time.perf_counter()
                self._exit(rec)

        # The two hot endpoints are served by plain Starlette handlers in front of the FastAPI app (its routing,
        # dependency and serialisation layers cost ~0.5 ms of CPU per request, which at 1,000+ requests/s on two
        # cores is taken from the client under test); everything else goes to FastAPI.
        return _FastPaths(app, {"/v1/chat/completions": chat, "/v1/embeddings": embeddings})


    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ScriptedServer":
        import uvicorn

        cfg = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                             timeout_keep_alive=30, backlog=4096)
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, name="scripted-server", daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("scripted server did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ assertions
    def requests(self, *, task_prefix: str = "", endpoint: str | None = None, status: int | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if r.task.startswith(task_prefix) and (endpoint is None or r.endpoint == endpoint)
                    and (status is None or r.status == status)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.scripted_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    p.add_argument("--fail-500", type=float, default=0.0, help="fraction of requests answered HTTP 500")
    p.add_argument("--fail-429", type=float, default=0.0, help="fraction of requests answered HTTP 429")
    p.add_argument("--malformed", type=float, default=0.0, help="fraction of agent replies with broken JSON")
    p.add_argument("--malformed-prefix", default="agent.",
                   help="tasks whose replies --malformed breaks (default agent.; judge. breaks verdicts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--responder", choices=sorted(RESPONDERS), default="default",
                   help="default: fixed verdicts by question; grounded: answers from the retrieved memories, "
                        "judged against the gold")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    srv = ScriptedServer(RESPONDERS[args.responder], latency_s=args.latency, fail_500=args.fail_500, fail_429=args.fail_429,
                         malformed=args.malformed, malformed_prefix=args.malformed_prefix, seed=args.seed,
                         embed_dim=args.embed_dim, host=args.host, port=args.port, keep_bodies=False).start()
    print(f"READY {srv.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
