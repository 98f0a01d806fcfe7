"""How often a builder's agent calls were valid, per agent, and how much of its synthetic QA was kept.

Reads expert-trajectory folders (`agent_calls.jsonl`, `qa_cache.jsonl`) and prints, per agent, the share of calls
whose output was valid at the first attempt and after retries, and the share of synthetic QA items kept. Used for
the README's table of the tiny local model (llama.cpp serving SmolLM2-135M): a tiny model's figures, not a result.

    python -m scripts.bench.validity_table --trajectory-dir expert_trajectories/demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from memory_system import AGENTS  # noqa: E402
from training import trajectories as tj  # noqa: E402


def validity(root: str | Path) -> dict:
    per = {a: {"calls": 0, "first": 0, "after": 0} for a in AGENTS}
    qa_asked = qa_kept = 0
    for path in tj.find_dialogues(root):
        calls, _ = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=True)
        for c in calls:
            row = per.get(c.get("agent"))
            if row is None:
                continue
            row["calls"] += 1
            if not c.get("error"):
                row["after"] += 1
                row["first"] += int(c.get("attempts") == 1)
        records, _ = tj.read_jsonl(path / tj.QA_CACHE_FILE, allow_partial_tail=True)
        for r in records:
            qa_asked += int(r.get("n_questions") or 0)
            qa_kept += len(r.get("pairs") or [])
    return {"agents": per, "qa_asked": qa_asked, "qa_kept": qa_kept}


def render(v: dict) -> str:
    def pct(n: int, d: int) -> str:
        return f"{100 * n / d:.0f} % ({n}/{d})" if d else "n/a"

    lines = ["| agent | calls | valid at the first attempt | valid after retries |", "|---|---|---|---|"]
    for a, r in v["agents"].items():
        lines.append(f"| {a} | {r['calls']} | {pct(r['first'], r['calls'])} | {pct(r['after'], r['calls'])} |")
    lines.append(f"| synthetic QA items kept | | {pct(v['qa_kept'], v['qa_asked'])} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.validity_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectory-dir", required=True)
    args = p.parse_args(argv)
    try:
        print(render(validity(args.trajectory_dir)))
    except tj.TrajectoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
