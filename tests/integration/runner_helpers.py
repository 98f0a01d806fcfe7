"""What the runner's integration tests share: run it in process, read JSONL, the demo against a scripted server."""
from __future__ import annotations

import json
import os
from pathlib import Path

from eval import runner

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MEMBUILDER_BACKOFF_BASE": "0.01"}


def run(*argv: str) -> int:
    return runner.main([*argv, "--no-progress"])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def demo_args(srv, tmp: Path, *extra: str) -> list[str]:
    """The demo dataset against `srv` (a ScriptedServer), memory and run folders under `tmp`."""
    return ["--dataset", "demo", "--provider", "openai", "--base-url", srv.base_url, "--api-key", "k",
            "--db-path", str(tmp / "db"), "--output-dir", str(tmp / "run"), *extra]
