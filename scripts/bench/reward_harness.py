"""What the reward-server tests and benchmarks share: expert-state fixtures, QA and outputs, and real processes.

- `build_expert_state(dir, client)`: a small expert memory (core + typed entries over several sessions) written
  through `MemorySystem.apply_actions` and `save()`, embedded by whatever `client` embeds with (the scripted
  server's hashed embeddings or the offline provider's local model).
- `ProcessServer`: a server started as a real subprocess that prints `READY <url>` (the scripted server and the
  reward server both do); stopped by its own pid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memory_system import MemorySystem, parse_actions  # noqa: E402

# Session facts of a made-up user; session 0 holds the fact the whole-state retrieval check asks about.
EARLY_FACT = "2023-01-08: Dana adopted a grey cat named Miso from the Oakland shelter | Details: said on 2023-01-08"
EARLY_QUESTION = "What is the name of the grey cat I adopted from the Oakland shelter?"
EARLY_ANSWER = "Miso"
_TOPICS = ["started a pottery class", "ran a 10k race in Berkeley", "visited her sister in Denver",
           "bought a used Subaru", "began learning Portuguese", "planted tomatoes on the balcony",
           "switched jobs to a biotech startup", "hosted a board game night", "repaired the kitchen sink",
           "booked flights to Lisbon", "read a novel about whaling", "joined a climbing gym"]


def session_actions(i: int) -> dict[str, str]:
    """The expert's raw outputs for session i (JSON strings, as an agent emits them)."""
    if i == 0:
        ep = [{"action": "ADD", "memory": EARLY_FACT}]
        sem = [{"action": "ADD", "memory": "Dana - Pets: Dana has a grey cat named Miso | Details: adopted 2023-01-08"}]
        core = {"operation": "APPEND", "content": "Name: Dana. Lives in Oakland. Works as a lab technician."}
    else:
        topic = _TOPICS[(i - 1) % len(_TOPICS)]
        day = f"2023-{1 + i // 4:02d}-{10 + i:02d}"
        ep = [{"action": "ADD", "memory": f"{day}: Dana {topic} | Details: mentioned in session {i}"},
              {"action": "ADD", "memory": f"{day}: Dana talked about weekend plans after she {topic} | Details: s{i}"}]
        sem = [{"action": "ADD", "memory": f"Dana - Hobby {i}: Dana {topic} | Details: session {i}"}]
        core = {"operation": "APPEND", "content": f"Recent: Dana {topic}."}
    proc = [] if i % 3 else [{"action": "ADD", "memory": f"Dana's routine {i} | Steps: 1. wake 2. stretch 3. coffee"}]
    return {"core": json.dumps(core), "episodic": json.dumps({"operations": ep}),
            "semantic": json.dumps({"operations": sem}), "procedural": json.dumps({"operations": proc})}


async def build_expert_state(directory: str | os.PathLike, client, n_sessions: int = 8) -> Path:
    """Save the expert's memory after `n_sessions` sessions into `directory` (memory.json + index.faiss)."""
    ms = MemorySystem(None, embedder=client)
    for i in range(n_sessions):
        acts = {a: parse_actions(a, raw) for a, raw in session_actions(i).items()}
        await ms.apply_actions(acts, f"s{i}")
    ms.save(directory)
    return Path(directory)


def qa_pairs(n: int = 5, *, with_early: bool = True) -> list[dict]:
    qs = [{"question": EARLY_QUESTION, "answer": EARLY_ANSWER, "type": "multi-session", "source": "cross_session"}]
    for i in range(1, n + 1):
        topic = _TOPICS[(i - 1) % len(_TOPICS)]
        qs.append({"question": f"What did I do when I {topic.split(' ', 1)[0]} something in session {i}?",
                   "answer": f"Dana {topic}", "type": "single-session", "source": "current_session"})
    return (qs if with_early else qs[1:])[:n]


def policy_outputs(tag: str) -> dict[str, str]:
    """Valid outputs a policy might emit for the current session; `tag` makes each sample distinguishable."""
    return {
        "core": json.dumps({"operation": "APPEND", "content": f"Dana is training for a half marathon ({tag})."}),
        "episodic": json.dumps({"operations": [{"action": "ADD", "memory": "2023-04-02: Dana signed up for the "
                                                "Oakland half marathon | Details: " + tag}]}),
        "semantic": json.dumps({"operations": [{"action": "ADD", "memory": f"Dana - Running: training plan ({tag})"}]}),
        "procedural": json.dumps({"operations": []}),
    }


# --------------------------------------------------------------------------- processes

class ProcessServer:
    """A server subprocess that prints `READY <url>`; its output is kept (last lines) for error messages."""

    def __init__(self, argv: Sequence[str], *, env: dict | None = None, cwd: str | os.PathLike = REPO,
                 ready_timeout_s: float = 120.0):
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.cwd = str(cwd)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: deque[str] = deque(maxlen=200)

    def start(self) -> "ProcessServer":
        self.url = None  # a restart (after `kill`) reads its own READY line
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if self.url is None and line.startswith("READY "):
                    self.url = line.split(None, 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=pump, name="server-output", daemon=True).start()
        if not ready.wait(self.ready_timeout_s) or self.url is None:
            tail = "\n".join(self.lines)
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv[:4])} did not become ready:\n{tail}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> "ProcessServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def scripted_server_process(*, latency: float = 0.0, fail_500: float = 0.0, fail_429: float = 0.0,
                            seed: int = 0, port: int = 0, malformed: float = 0.0,
                            malformed_prefix: str = "agent.", responder: str = "default") -> ProcessServer:
    return ProcessServer([sys.executable, "-m", "scripts.scripted_server", "--latency", str(latency),
                          "--fail-500", str(fail_500), "--fail-429", str(fail_429), "--seed", str(seed),
                          "--port", str(port), "--malformed", str(malformed), "--malformed-prefix", malformed_prefix,
                          "--responder", responder])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(server: ProcessServer) -> None:
    """Take a server away at once (SIGKILL): connections drop, the port refuses until it is started again."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=10)
    server.proc = None


def reward_server_process(state_root: str | os.PathLike, base_url: str, *, token: str | None = None,
                          max_in_flight: int = 32, extra: Sequence[str] = (), env: dict | None = None) -> ProcessServer:
    """The reward server as a real uvicorn process on 127.0.0.1 (any free port), answering and judging through
    `base_url` (an OpenAI-compatible server; embeddings from the same place)."""
    argv = [sys.executable, "-m", "training.reward_server.server", "--host", "127.0.0.1", "--port", "0",
            "--state-root", str(state_root), "--provider", "openai", "--base-url", base_url, "--api-key", "test",
            "--embedding-base-url", base_url, "--embedding-api-key", "test", "--max-in-flight", str(max_in_flight),
            "--log-level", os.environ.get("REWARD_BENCH_LOG_LEVEL", "warning"), *extra]
    e = {"REWARD_SERVER_TOKEN": token or "", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": "",
         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **(env or {})}
    return ProcessServer(argv, env=e)


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
