"""Synthetic session QA for expert-trajectory dialogues: fill `<dialogue>/qa_cache.jsonl` (resumable), and the CLI.

    python -m training.session_qa --trajectory-dir expert_trajectories/longmemeval --qa-per-session 5 \
        --model claude-4.5-opus

The questions themselves come from `qa_generator.generate_session_qa` (PAPER §4); this module knows the trajectory
layout (training/trajectories.py): the memory before session i is `states/state_<i>`, the session text is what the
agents saw in `agent_calls.jsonl`.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import config
from llm_client import AVAILABLE_PROVIDERS, LLMClient
from memory_store import append_jsonl
from qa_generator import generate_session_qa, qa_client
from training import trajectories as tj

log = logging.getLogger("session_qa")
QA_CACHE_FILE = tj.QA_CACHE_FILE


def session_inputs(dialogue, i: int) -> tuple[str, str | None]:
    """(session text as the agents saw it, session time) of session i of a trajectory dialogue."""
    calls = dialogue.calls_by_session().get(i) or {}
    text = next((c["inputs"]["session_text"] for c in calls.values()
                 if isinstance(c.get("inputs"), dict) and "session_text" in c["inputs"]), None)
    if text is None:
        raise ValueError(f"{dialogue.path}: session {i} has no recorded session text")
    meta_sessions = dialogue.sessions()
    time_ = meta_sessions[i].get("time") if i < len(meta_sessions) else None
    if time_ is None:
        time_ = next((c.get("session_time") for c in calls.values() if c.get("session_time")), None)
    return text, time_


def memory_before(dialogue, i: int) -> tuple[str, list[tuple[str, str]]]:
    """The core block and every (type, text) entry of the memory before session i (MemoryStoreError if corrupt)."""
    from memory_store import read_memory_file
    from memory_system import MemoryState

    state = MemoryState.from_dict(read_memory_file(dialogue.state_path(i) / "memory.json"))
    return state.core, [(e.type, e.text) for e in state.entries]


def cache_key(session_index: int, n: int, model: str) -> str:
    return f"{session_index}|{n}|{model}"


def read_qa_cache(dialogue_dir: str | Path) -> dict[str, dict]:
    """Usable cached QA records by key (a torn last line from a killed run is ignored; later records win)."""
    records, _ = tj.read_jsonl(Path(dialogue_dir) / tj.QA_CACHE_FILE, allow_partial_tail=True, what=tj.QA_CACHE_FILE)
    out = {}
    for r in records:
        if r.get("pairs") and "session_index" in r:
            out[cache_key(int(r["session_index"]), int(r.get("n_questions", 0)), str(r.get("model")))] = r
    return out


async def fill_qa_cache(client: LLMClient, dialogue, n: int, *, sessions: Iterable[int] | None = None,
                        semaphore: asyncio.Semaphore | None = None,
                        on_done: Callable[[int, dict], None] | None = None) -> dict[int, dict]:
    """QA for the sessions of one dialogue: cached records are reused, missing ones generated and appended to
    `qa_cache.jsonl` as they finish (so a killed run keeps what it had). Returns {session_index: record}."""
    cache = read_qa_cache(dialogue.path)
    wanted = list(range(dialogue.finished_sessions)) if sessions is None else list(sessions)
    out: dict[int, dict] = {}
    sem = semaphore or asyncio.Semaphore(config.DEFAULT_MAX_IN_FLIGHT)

    async def one(i: int) -> None:
        hit = cache.get(cache_key(i, n, client.model))
        if hit is not None:
            out[i] = hit
            if on_done:
                on_done(i, hit)
            return
        text, time_ = session_inputs(dialogue, i)
        core, entries = memory_before(dialogue, i)
        async with sem:
            result = await generate_session_qa(client, core=core, entries=entries, session_text=text,
                                               session_time=time_, n=n)
        meta_sessions = dialogue.sessions()
        rec = {"session_index": i, "session_id": meta_sessions[i].get("id") if i < len(meta_sessions) else None,
               "n_questions": n, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               **result.to_dict()}
        append_jsonl(dialogue.path / tj.QA_CACHE_FILE, [rec])
        out[i] = rec
        if on_done:
            on_done(i, rec)

    await asyncio.gather(*(one(i) for i in wanted))
    return out


# --------------------------------------------------------------------------- CLI

def build_parser() -> "tj.OneLineParser":
    p = tj.OneLineParser(prog="python -m training.session_qa", description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectory-dir", "--trajectories-dir", dest="trajectory_dir", default="expert_trajectories",
                   help="a dialogue folder, a dataset folder or the trajectories root (default expert_trajectories)")
    p.add_argument("--sample-id", nargs="+", action="extend", help="only these dialogues")
    p.add_argument("--sessions", help="only these session indices, e.g. 0,3,7")
    p.add_argument("--qa-per-session", type=int, default=config.QA_PER_SESSION)
    p.add_argument("--provider", default="openai", choices=AVAILABLE_PROVIDERS)
    p.add_argument("--model", default=config.QA_GENERATION_MODEL)
    p.add_argument("--base-url")
    p.add_argument("--api-key")
    p.add_argument("--workers", type=int, default=8, help="QA requests in flight")
    p.add_argument("--request-timeout", type=float, default=config.DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds one QA-generation attempt may take, to the whole reply")
    p.add_argument("--max-tokens-qa", type=int, default=config.MAX_TOKENS_QA, help="reply cap of QA generation")
    p.add_argument("--output", help="also write every session's QA record to this JSONL file")
    p.add_argument("--allow-test-split", action="store_true",
                   help="allow dialogues of held-out LongMemEval test instances (refused by default)")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return tj.cli_exit(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.qa_per_session < 1:
            raise tj.TrajectoryError("--qa-per-session must be at least 1")
        if args.workers < 1:
            raise tj.TrajectoryError("--workers must be at least 1")
        dialogues = [tj.load_dialogue(p) for p in tj.find_dialogues(args.trajectory_dir)]
        tj.refuse_test_split(((d.dataset, d.sample_id) for d in dialogues), args.allow_test_split, "dialogue")
        if args.sample_id:
            known = {d.sample_id for d in dialogues}
            unknown = [s for s in args.sample_id if s not in known]
            if unknown:
                raise tj.TrajectoryError(f"unknown sample id(s) {', '.join(unknown[:3])} under {args.trajectory_dir}")
            dialogues = [d for d in dialogues if d.sample_id in set(args.sample_id)]
        sessions = None
        if args.sessions:
            try:
                sessions = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
            except ValueError:
                raise tj.TrajectoryError(f"--sessions must be comma-separated integers, not {args.sessions!r}") from None
            for d in dialogues:
                bad = [i for i in sessions if not 0 <= i < d.finished_sessions]
                if bad:
                    raise tj.TrajectoryError(f"{d.sample_id} has no session {bad[0]} ({d.finished_sessions} sessions)")
        client = qa_client(args.provider, args.model, args.base_url, args.api_key, args.workers,
                           timeout_s=args.request_timeout, max_tokens=args.max_tokens_qa)
    except (tj.TrajectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    total = sum(len(sessions) if sessions is not None else d.finished_sessions for d in dialogues)
    t0 = time.perf_counter()
    results: list[tuple[str, int, dict]] = []

    async def run() -> None:
        sem = asyncio.Semaphore(args.workers)
        with tqdm(total=total, desc="session QA", unit="session", disable=None) as bar:
            def done(d, i, rec):
                results.append((d.sample_id, i, rec))
                bar.update(1)

            try:
                await asyncio.gather(*(fill_qa_cache(client, d, args.qa_per_session, sessions=sessions, semaphore=sem,
                                                     on_done=lambda i, rec, d=d: done(d, i, rec)) for d in dialogues))
            finally:
                await client.aclose()

    asyncio.run(run())
    if args.output:
        ordered = sorted(results, key=lambda r: (r[0], r[1]))
        tj.write_jsonl(args.output, [{"sample_id": s, **rec} for s, _, rec in ordered])
    n_pairs = sum(len(rec.get("pairs") or []) for _, _, rec in results)
    failed = [(s, i, rec.get("error")) for s, i, rec in results if not rec.get("pairs")]
    short = sum(1 for _, _, rec in results if rec.get("pairs") and len(rec["pairs"]) < args.qa_per_session)
    print(f"session QA: {len(dialogues)} dialogue(s), {len(results)} session(s), {n_pairs} question(s), "
          f"{short} session(s) short of {args.qa_per_session}, {len(failed)} failed; model {client.model}; "
          f"{time.perf_counter() - t0:.1f}s")
    for s, i, err in failed[:10]:
        print(f"  ! {s} session {i}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
