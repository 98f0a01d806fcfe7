"""Worker processes that send the chat requests with the openai SDK, on other cores than the event loop.

The SDK costs about 1 ms of CPU per request (its request options, headers, URL and response handling) on top of
the transport. At a few hundred requests a second that is most of one core, and an asyncio process has one: with
`--client-processes N` the chat requests of every client on the event loop are sent by N worker processes instead,
and the loop keeps ~0.1 ms per request (one frame out, one back).

Everything that decides stays in the calling process (`LLMClient`): retries, deadlines, validation, usage, the
cache. A worker runs `AsyncOpenAI.post(path, body=..., cast_to=object)` and sends back the JSON body, or the failure
as data that `rebuild_error` turns back into the SDK's own exception (a status error is rebuilt by the SDK from the
status, headers and body), so the caller classifies it exactly as it classifies an in-process one. A request the
caller stops waiting for (its deadline) is cancelled in the worker; a worker that dies fails its requests as a
connection error (retried by the caller) and the next request starts a new one.

Frames on the pipes: a 4-byte big-endian length, then a pickle (the peers are this process and its children).
    parent -> worker  ("post", id, cfg, path, body, headers) | ("cancel", id) | ("client", cfg)   (build it ahead)
                      cfg = (base_url, api_key, timeout_s, aiohttp)
    worker -> parent  ("ready",) | ("ok", id, json) | ("err", id, (kind, detail...))

    python http_workers.py     (started by `WorkerPool`; not a command for users)
"""
from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import signal
import struct
import sys
from pathlib import Path
from typing import Any

_HDR = struct.Struct("!I")
_WORKER_START_S = 60.0  # importing the SDK on a loaded machine takes seconds; more means the worker is broken


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    n = _HDR.unpack(await reader.readexactly(_HDR.size))[0]
    return pickle.loads(await reader.readexactly(n))


class WorkerGone(Exception):
    """The worker process that held a request exited before answering it."""


# --------------------------------------------------------------------------- the caller's side

class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.pending: dict[int, asyncio.Future] = {}
        self.alive = True
        self.reader_task: asyncio.Task | None = None


class WorkerPool:
    """N worker processes bound to the running event loop; `post` sends one request through the least busy one."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("a worker pool needs at least one process")
        self.n = n
        self.users = 0
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._starting: asyncio.Task | None = None
        self._closed = False
        self._cfgs: list[tuple] = []  # every client configuration seen: each worker builds its SDK client ahead

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        try:
            async with asyncio.timeout(_WORKER_START_S):
                hello = await _read_frame(proc.stdout)
        except (asyncio.IncompleteReadError, TimeoutError, pickle.UnpicklingError) as exc:
            proc.kill()
            await proc.wait()
            raise WorkerGone(f"an HTTP worker process did not start ({type(exc).__name__})") from None
        if hello != ("ready",):
            proc.kill()
            await proc.wait()
            raise WorkerGone(f"an HTTP worker process said {hello!r} instead of ready")
        w = _Worker(proc)
        w.reader_task = asyncio.create_task(self._read(w))
        for cfg in self._cfgs:
            proc.stdin.write(_frame(("client", cfg)))
        return w

    async def _fill(self) -> None:
        missing = self.n - sum(w.alive for w in self._workers)
        if missing > 0:
            new = await asyncio.gather(*(self._spawn() for _ in range(missing)))
            self._workers = [w for w in self._workers if w.alive] + list(new)

    async def _ready(self) -> None:
        if self._closed:
            raise WorkerGone("the HTTP worker pool is closed")
        if all(w.alive for w in self._workers) and len(self._workers) == self.n:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._fill())
        await asyncio.shield(self._starting)

    async def _read(self, w: _Worker) -> None:
        try:
            while True:
                msg = await _read_frame(w.proc.stdout)
                fut = w.pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError, EOFError):
            pass
        finally:
            w.alive = False
            for fut in w.pending.values():
                if not fut.done():
                    fut.set_exception(WorkerGone("the HTTP worker process exited"))
            w.pending.clear()

    async def post(self, cfg: tuple[str | None, str, float, bool], path: str, body: dict, headers: dict) -> tuple:
        """("ok", json) or ("err", (kind, ...)) for one POST; WorkerGone when its worker died first."""
        await self._ready()
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerGone("no HTTP worker process is running")
        if cfg not in self._cfgs:
            # Building an SDK client costs ~0.1 s (its SSL context, the aiohttp session): every worker builds this
            # one now, not the first time a request lands on it (a wave of requests would wait for it).
            self._cfgs.append(cfg)
            for other in live:
                try:
                    other.proc.stdin.write(_frame(("client", cfg)))
                except (ConnectionError, RuntimeError):
                    pass
        w = min(live, key=lambda x: len(x.pending))
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        w.pending[rid] = fut
        try:
            w.proc.stdin.write(_frame(("post", rid, cfg, path, body, headers)))
            if w.proc.stdin.transport.get_write_buffer_size() > 1 << 20:
                await w.proc.stdin.drain()
            msg = await fut
        except asyncio.CancelledError:
            w.pending.pop(rid, None)
            if w.alive:
                try:
                    w.proc.stdin.write(_frame(("cancel", rid)))
                except (ConnectionError, RuntimeError):
                    pass
            raise
        except (ConnectionError, RuntimeError) as exc:  # the pipe broke under the write
            w.pending.pop(rid, None)
            raise WorkerGone(f"the HTTP worker process is gone ({type(exc).__name__})") from None
        return msg[0], msg[2]

    async def aclose(self) -> None:
        self._closed = True
        for w in self._workers:
            try:
                w.proc.stdin.close()
            except (ConnectionError, RuntimeError):
                pass
        for w in self._workers:
            try:
                async with asyncio.timeout(5):
                    await w.proc.wait()
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            if w.reader_task is not None:
                await asyncio.gather(w.reader_task, return_exceptions=True)
        self._workers = []


_POOLS: dict[int, tuple[asyncio.AbstractEventLoop, WorkerPool]] = {}


def acquire_pool(n: int) -> WorkerPool:
    """The running loop's pool (one per loop, shared by its clients; the first caller's size wins)."""
    loop = asyncio.get_running_loop()
    for key, (lp, _) in list(_POOLS.items()):
        if lp.is_closed():
            del _POOLS[key]
    entry = _POOLS.get(id(loop))
    if entry is None or entry[0] is not loop:
        entry = _POOLS[id(loop)] = (loop, WorkerPool(n))
    entry[1].users += 1
    return entry[1]


async def release_pool(pool: WorkerPool) -> None:
    """One client is done with the pool; the last one closes it (its worker processes exit)."""
    pool.users -= 1
    if pool.users <= 0:
        for key, (lp, p) in list(_POOLS.items()):
            if p is pool:
                del _POOLS[key]
        await pool.aclose()


def workers_cpu_s() -> float:
    """CPU seconds the live worker processes of every pool have used (0 without psutil)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for _, pool in list(_POOLS.values()):
        for w in pool._workers:
            if w.alive:
                try:
                    t = psutil.Process(w.proc.pid).cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
    return total


def rebuild_error(detail: tuple, sdk_client: Any) -> BaseException:
    """The SDK exception a worker reported, rebuilt in the caller (`sdk_client`: any AsyncOpenAI of the caller)."""
    import httpx2
    import openai

    kind = detail[0]
    if kind == "status":
        _, code, headers, content, url = detail
        resp = httpx2.Response(code, headers=headers, content=content, request=httpx2.Request("POST", url))
        return sdk_client._make_status_error_from_response(resp)
    if kind == "timeout":
        return openai.APITimeoutError(request=httpx2.Request("POST", detail[1]))
    if kind == "connection":
        return openai.APIConnectionError(message=detail[2], request=httpx2.Request("POST", detail[1]))
    return _named_error(detail[1])(detail[2])


_ERROR_TYPES: dict[str, type] = {}


def _named_error(name: str) -> type:
    """An exception type with the worker's exception's name (the caller's messages name it)."""
    name = name if name.isidentifier() else "Exception"
    if name not in _ERROR_TYPES:
        _ERROR_TYPES[name] = type(name, (Exception,), {})
    return _ERROR_TYPES[name]


# --------------------------------------------------------------------------- the worker

def _portable(exc: BaseException, url: str) -> tuple:
    import openai

    if isinstance(exc, openai.APIStatusError):
        r = exc.response
        try:
            url = str(r.request.url)
        except RuntimeError:  # a response without its request
            pass
        return ("status", r.status_code, dict(r.headers), r.content, url)
    if isinstance(exc, openai.APITimeoutError):
        return ("timeout", url)
    if isinstance(exc, openai.APIConnectionError):
        return ("connection", url, str(exc))
    return ("other", type(exc).__name__, str(exc)[:2000])


async def _serve() -> None:
    import gc

    import openai

    # The SDK's modules and types live as long as the process: out of the collector's scans, and the young generation
    # collected every 50,000 allocations (each request allocates hundreds of short-lived objects).
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(1, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    clients: dict[tuple, Any] = {}
    tasks: dict[int, asyncio.Task] = {}

    def client_for(cfg: tuple):
        client = clients.get(cfg)
        if client is None:
            base_url, api_key, timeout_s, aiohttp = cfg
            extra = {"http_client": openai.DefaultAioHttpClient()} if aiohttp else {}
            client = clients[cfg] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                                       timeout=timeout_s, **extra)
        return client

    async def post(rid: int, cfg: tuple, path: str, body: dict, headers: dict) -> None:
        url = path
        try:
            client = client_for(cfg)
            url = f"{str(client.base_url).rstrip('/')}{path}"  # the SDK's default host where base_url is None
            out = ("ok", rid, await client.post(path, body=body, cast_to=object, options={"headers": headers}))
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as data
            out = ("err", rid, _portable(exc, url))
        finally:
            tasks.pop(rid, None)
        try:
            writer.write(_frame(out))
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be pickled is a bad reply
            writer.write(_frame(("err", rid, ("other", type(exc).__name__, str(exc)[:2000]))))

    writer.write(_frame(("ready",)))
    try:
        while True:
            try:
                msg = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the caller closed the pipe (or exited): stop
            if msg[0] == "post":
                tasks[msg[1]] = asyncio.create_task(post(*msg[1:]))
            elif msg[0] == "client":
                try:
                    client_for(msg[1])
                except Exception:  # noqa: BLE001 - the request that needs it will report the error
                    pass
            elif msg[0] == "cancel":
                task = tasks.pop(msg[1], None)
                if task is not None:
                    task.cancel()
    finally:
        for task in list(tasks.values()):
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for client in clients.values():
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def main() -> int:
    # Ctrl-C reaches the whole process group: the caller handles it and closes the pipes, which ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # uvloop (uvicorn[standard] installs it) runs this loop's transports ~10% cheaper
        import uvloop
    except ImportError:
        asyncio.run(_serve())
    else:
        uvloop.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
