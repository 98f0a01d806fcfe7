"""Store scale: build one 500-session sample and show that a session's save costs what it adds.

The sample is LongMemEval-M scale: the sessions of the LongMemEval sample instance repeated (new ids) to 500, built
through `MemorySystem.build_session` against the scripted OpenAI-compatible server (no latency) with 1,536-d
embeddings and 3 entries per session (one per entry agent), saved after every session with `persist` (the runner's
path: one record appended to the session log) and compacted at the end. It prints bytes written and time per session
for sessions 1-50 and 451-500, the total bytes written against the final store's size, and the ratios the issue
bounds (per-session bytes late/early <= 1.5, total <= 3x the final store, time per session late/early <= 1.3). Time
per session is the CPU time of this process (client, in-process server and store together; the server has no
latency, so a session is pure work), sessions 1-50 read twice: at the start and, from a fresh sample, right after
the 500th session, the slower reading counting, so that a machine whose speed drifts over the run (a shared virtual
machine: the run prints the hypervisor's steal) does not pass for growth either way. Wall times are printed beside.
`--full-save` also times the old way (the whole memory rewritten after every session) over the first N sessions.

    python -m scripts.bench.bench_scale [--sessions 500] [--dim 1536] [--full-save 100]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIMIT_BYTES, LIMIT_TOTAL, LIMIT_TIME = 1.5, 3.0, 1.3
SAMPLE = ROOT.parent / "shared" / "data" / "longmemeval" / "longmemeval_s_sample.json"


def three_entries(task: str, body: dict) -> str:
    from scripts.scripted_server import _session_lines

    lines = _session_lines(body)
    first = (lines[0] if lines else "(empty)")[:160]
    if task == "agent.core":
        return json.dumps({"operation": "APPEND", "content": f"note: {first[:60]}"})
    if task.startswith("agent."):
        kind = task.split(".", 1)[1]
        return json.dumps({"operations": [{"action": "ADD", "memory": f"{kind}: {first} | Details: {lines[1:2]}"}]})
    if task == "core.compress":
        return json.dumps({"content": "compressed profile"})
    return json.dumps({"ok": True})


def sessions_for(n: int):
    from eval.datasets import load_dataset

    if SAMPLE.is_file():
        base = load_dataset("longmemeval", dataset_path=SAMPLE)[0].sessions
    else:  # without the shared data: a synthetic conversation of the same shape
        from eval.datasets import Message, Session

        base = [Session(f"s{i}", "2023/05/01 (Mon) 10:00", [Message("user", f"I went to place {i} with friend {i % 7}."),
                                                             Message("assistant", "Noted.")]) for i in range(50)]
    out = []
    for i in range(n):
        s = base[i % len(base)]
        out.append(type(s)(id=f"{s.id}#{i}", time=s.time, messages=list(s.messages)))
    return out


async def build(url: str, folder: Path, sessions, dim: int, full_save: bool) -> list[tuple[int, float]]:
    import memory_store
    from llm_client import LLMClient
    from memory_system import MemorySystem

    client = LLMClient(provider="openai", base_url=url, api_key="bench", embedding_base_url=url,
                       embedding_api_key="bench", max_retries=0)
    ms = MemorySystem(client)
    per_session = []
    try:
        for s in sessions:
            t0, c0 = time.perf_counter(), time.process_time()
            b0 = memory_store.IO_STATS["bytes_written"]
            res = await ms.build_session(s)
            assert res.applied, res.failures
            (ms.save if full_save else ms.persist)(folder)
            per_session.append((memory_store.IO_STATS["bytes_written"] - b0, time.process_time() - c0,
                                time.perf_counter() - t0))
        if not full_save:
            ms.save(folder)  # the compaction at the end of the sample
    finally:
        await client.aclose()
    assert len(ms.state.entries) == 3 * len(sessions), len(ms.state.entries)
    return per_session


def main(argv: list[str] | None = None) -> int:
    import memory_store
    from scripts.bench.machine import cpu_steal, steal_share
    from scripts.scripted_server import ScriptedServer

    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--full-save", type=int, default=0, help="also time the whole-memory save over this many sessions")
    args = p.parse_args(argv)
    sessions = sessions_for(args.sessions)
    with ScriptedServer(three_entries, embed_dim=args.dim, keep_bodies=False) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sample"
        b_start = memory_store.IO_STATS["bytes_written"]
        st0 = cpu_steal()
        t_start = time.perf_counter()
        per = asyncio.run(build(srv.base_url, folder, sessions, args.dim, False))
        total_s = time.perf_counter() - t_start
        # Sessions 1-50 once more, of a fresh sample built right after the 500th session: the same early sessions
        # measured next to the late ones, so a machine that slowed down (or sped up) over the run is not read as
        # growth.
        k = min(50, len(per) // 2)
        again = asyncio.run(build(srv.base_url, Path(tmp) / "again", sessions[:k], args.dim, False))
        steal = steal_share(st0, cpu_steal())
        total_bytes = memory_store.IO_STATS["bytes_written"] - b_start
        final = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        old = None
        if args.full_save:
            per_old = asyncio.run(build(srv.base_url, Path(tmp) / "full", sessions[: args.full_save], args.dim, True))
            old = sum(b for b, *_ in per_old), sum(b for b, *_ in per_old[-10:]) / 10
    early, late = per[:k], per[-k:]
    b_early, b_late = statistics.mean(b for b, *_ in early), statistics.mean(b for b, *_ in late)
    t_first, t_late = statistics.median(t for _, t, _ in early), statistics.median(t for _, t, _ in late)
    t_again = statistics.median(t for _, t, _ in again)
    t_early = max(t_first, t_again)  # the slower reading of sessions 1-50: drift either way is not growth
    w_early, w_late = statistics.median(w for *_, w in early), statistics.median(w for *_, w in late)
    r_bytes, r_total, r_time = b_late / b_early, total_bytes / final, t_late / t_early
    print(f"{len(per)} sessions, {args.dim}-d embeddings, 3 entries per session; final store {final / 2**20:.2f} MiB; "
          f"{total_s:.1f} s in all")
    print(f"bytes written per session: sessions 1-{k} {b_early:,.0f} B, sessions {len(per) - k + 1}-{len(per)} "
          f"{b_late:,.0f} B -> ratio {r_bytes:.2f} (limit {LIMIT_BYTES})")
    print(f"total bytes written {total_bytes / 2**20:.2f} MiB = {r_total:.2f}x the final store (limit {LIMIT_TOTAL})")
    print(f"time per session (median CPU): sessions 1-{k} {t_first * 1000:.1f} ms (again after the 500th: "
          f"{t_again * 1000:.1f} ms), sessions {len(per) - k + 1}-{len(per)} {t_late * 1000:.1f} ms -> ratio "
          f"{r_time:.2f} (limit {LIMIT_TIME}; against the first reading alone {t_late / t_first:.2f}); wall "
          f"{w_early * 1000:.1f} / {w_late * 1000:.1f} ms -> {w_late / w_early:.2f}, with {steal:.0%} of the "
          f"machine's CPU time taken by the hypervisor (steal)")
    if old:
        print(f"for reference, rewriting the whole memory after every session: {old[0] / 2**20:.1f} MiB over the first "
              f"{args.full_save} sessions, {old[1]:,.0f} B per session at the end")
    ok = r_bytes <= LIMIT_BYTES and r_total <= LIMIT_TOTAL and r_time <= LIMIT_TIME
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
