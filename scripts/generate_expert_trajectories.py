"""Expert trajectories: run the memory builder with an expert model over dialogues and record every decision.

The builder is the evaluation builder itself (`MemorySystem.build_session`: the same prompts, `parse_actions` and
`apply`), so SFT and RL data teach exactly the decisions evaluation makes. Per dialogue,
`<output-dir>/<dataset>/<sample_id>/` gets the memory before every session (`states/state_<i>`, `state_<n>` is the
final memory), one `agent_calls.jsonl` line per agent call (prompt messages, inputs, the expert's raw output, parsed
actions, model, latency, tokens, attempts, error) and `metadata.json` (layout: training/trajectories.py).

A killed run resumes at the first unfinished session; `--skip-existing` skips finished dialogues (without it a
finished dialogue is generated again from scratch). Samples run concurrently with `--parallel --workers N`; the
sessions of one sample run in order.

    python scripts/generate_expert_trajectories.py --dataset longmemeval --split sft --expert-model claude-4.5-sonnet \
        --parallel --workers 8 --skip-existing
    python scripts/generate_expert_trajectories.py --dataset longmemeval --dataset-path data/longmemeval/x.json --provider offline
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from llm_client import (AVAILABLE_PROVIDERS, ClientSettings, LLMClient, add_call_budget_args,  # noqa: E402
                        call_budget, configure_logging)
from memory_system import AGENTS, MemorySystem  # noqa: E402
from training import trajectories as tj  # noqa: E402
from training.trajectories import OneLineParser  # noqa: E402

log = logging.getLogger("generate_expert_trajectories")


class UserError(Exception):
    """Ends the run with one line on stderr and exit code 2."""


class _NotBuilt(Exception):
    """A session that could not be built (its reason is recorded; a rerun resumes there)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- planning

@dataclass
class Job:
    sample: object  # eval.datasets.Sample
    path: Path
    action: str  # "fresh" | "resume" | "skip"
    start: int = 0
    plan: tj.ResumePlan | None = None
    note: str = ""


@dataclass
class JobResult:
    sample_id: str
    action: str
    sessions_built: int = 0
    calls: int = 0
    failed_calls: int = 0
    error: str | None = None
    finished: bool = False


def _settings_of(client: LLMClient) -> dict:
    s = client.settings
    return {"expert_model": s.model, "provider": s.provider, "embedding_provider": s.embedding_provider,
            "embedding_model": s.embedding_model}


def _check_settings(meta: dict, settings: dict, path: Path) -> None:
    """A dialogue may only be continued with the expert and embeddings that began it."""
    for key in ("expert_model", "provider", "embedding_model"):
        if key in meta and meta[key] != settings[key]:
            raise UserError(f"{path} was generated with {key} {meta[key]!r}, not {settings[key]!r}: use the same "
                            f"settings to resume it, or delete the folder to start over")


def plan_job(sample, out_root: Path, dataset: str, settings: dict, skip_existing: bool) -> Job:
    """What to do with one sample: start fresh, resume (or extend) a recorded dialogue, or skip a finished one.

    Recorded and selected sessions must agree on their common prefix; a dialogue recorded with fewer sessions
    (say a `--sessions 8` smoke run) is extended, with `--skip-existing`, rather than generated again."""
    path = out_root / dataset / tj.safe_name(sample.id)
    meta_path = path / tj.METADATA_FILE
    if not meta_path.is_file():
        if (path / tj.CALLS_FILE).exists() or (path / tj.STATES_DIR).exists():
            # metadata is written first, so this is debris from a run killed at its very start
            return Job(sample, path, "fresh", note="no metadata; starting over")
        return Job(sample, path, "fresh")
    try:
        meta = tj.read_json(meta_path, "trajectory metadata")
    except tj.TrajectoryError as exc:
        raise UserError(str(exc)) from None
    if str(meta.get("sample_id")) != str(sample.id):
        raise UserError(f"{path} belongs to sample {meta.get('sample_id')!r}, not {sample.id!r} (ids that fold to the "
                        "same folder name?)")
    recorded = [str(s.get("id")) for s in meta.get("sessions") or []]
    selected = [str(s.id) for s in sample.sessions]
    same_prefix = recorded[: len(selected)] == selected[: len(recorded)]
    complete = meta.get("status") == tj.STATUS_COMPLETE
    if complete and not skip_existing:
        return Job(sample, path, "fresh", note="finished; generating again (use --skip-existing to keep it)")
    if not same_prefix:
        raise UserError(f"{path} holds other sessions than the dataset gives for sample {sample.id!r} "
                        f"({len(recorded)} recorded, {len(selected)} selected): delete the folder to start over")
    if complete and len(recorded) >= len(selected):
        try:
            tj.load_dialogue(path, require_complete=True)
        except tj.TrajectoryError as exc:
            raise UserError(f"{exc} (the dialogue is marked finished; delete {path} to generate it again)") from None
        return Job(sample, path, "skip", note="finished")
    _check_settings(meta, settings, path)
    try:
        calls, partial = tj.read_jsonl(path / tj.CALLS_FILE, allow_partial_tail=not complete, what=tj.CALLS_FILE)
    except tj.TrajectoryError as exc:
        raise UserError(str(exc)) from None
    plan = tj.plan_resume(calls, len(sample.sessions), tj.existing_states(path), dropped_partial_line=partial)
    verb = "extending" if complete else "resuming"
    return Job(sample, path, "resume", start=plan.start, plan=plan,
               note=f"{verb} at session {plan.start} of {len(sample.sessions)}")


# --------------------------------------------------------------------------- running

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _save_state(ms: MemorySystem, path: Path, i: int) -> None:
    """Save into a temporary folder, then rename it into place: a state folder is either whole or absent."""
    final = tj.state_dir(path, i)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tj.remove_tree(tmp)
    ms.save(tmp)
    tj.remove_tree(final)
    os.replace(tmp, final)


def _session_summary(i: int, session, result=None, calls: dict | None = None, n_entries: int | None = None) -> dict:
    d = {"index": i, "id": session.id, "time": session.time, "n_messages": len(session.messages)}
    if result is not None:
        d.update(new_entries=len(result.new_entries), failures=dict(result.failures), notes=list(result.notes),
                 core_compressed=result.core_compressed,
                 latency_s=round(max((c.latency_s for c in result.calls.values()), default=0.0), 3))
    else:  # rebuilt on resume from what is on disk
        d.update(new_entries=n_entries, failures={a: c.get("error") for a, c in (calls or {}).items() if c.get("error")},
                 notes=["summary rebuilt on resume"])
    return d


class Generator:
    def __init__(self, client: LLMClient, dataset: str, settings: dict, progress=None):
        self.client = client
        self.dataset = dataset
        self.settings = settings
        self.progress = progress

    def _metadata(self, job: Job, done: list[dict], status: str, started: str, error: str | None = None) -> dict:
        sample = job.sample
        sessions = [dict(d) for d in done]
        sessions += [{"index": i, "id": s.id, "time": s.time, "n_messages": len(s.messages)}
                     for i, s in enumerate(sample.sessions) if i >= len(done)]
        calls = sum(4 for _ in done)
        failed = sum(len(d.get("failures") or {}) for d in done)
        meta = {
            "format_version": tj.FORMAT_VERSION, "sample_id": sample.id, "dataset": self.dataset,
            "source_dataset": getattr(sample, "dataset", self.dataset), **self.settings,
            "n_sessions": len(sample.sessions), "sessions_done": len(done), "status": status,
            "n_agent_calls": calls, "n_failed_calls": failed, "agents": list(AGENTS),
            "current_time": sample.current_time, "question_ids": [q.id for q in sample.questions],
            "split": (sample.meta or {}).get("split"), "final_state": tj.state_relpath(len(sample.sessions)),
            "started_at": started, "updated_at": _now(), "sessions": sessions,
        }
        if error:
            meta["last_error"] = error
        return meta

    def _recover_summaries(self, job: Job, meta: dict) -> list[dict]:
        """Per-session summaries of the finished sessions: from the metadata, rebuilt from disk where it lags."""
        old = {int(d.get("index", -1)): d for d in meta.get("sessions") or [] if "new_entries" in d}
        by_session = tj.session_calls(job.plan.kept_calls if job.plan else [])
        out = []
        for i in range(job.start):
            if i in old:
                out.append(old[i])
                continue
            n_before = len(tj.read_json(tj.state_dir(job.path, i) / "memory.json", "state")["entries"])
            n_after = len(tj.read_json(tj.state_dir(job.path, i + 1) / "memory.json", "state")["entries"])
            out.append(_session_summary(i, job.sample.sessions[i], calls=by_session.get(i), n_entries=n_after - n_before))
        return out

    async def _open(self, job: Job, started: str) -> tuple[MemorySystem, list[dict], str]:
        """The memory to continue from, the summaries of the finished sessions, and the run's start time."""
        path = job.path
        if job.action == "fresh":
            tj.remove_tree(path)
            (path / tj.STATES_DIR).mkdir(parents=True)
            tj.write_json(path / tj.METADATA_FILE, self._metadata(job, [], tj.STATUS_IN_PROGRESS, started))
            ms = MemorySystem(self.client)
            _save_state(ms, path, 0)
            (path / tj.CALLS_FILE).write_text("", encoding="utf-8")
            return ms, [], started
        meta = tj.read_json(path / tj.METADATA_FILE, "trajectory metadata")
        plan = job.plan
        if plan.changed or not (path / tj.CALLS_FILE).is_file():
            tj.write_jsonl(path / tj.CALLS_FILE, plan.kept_calls)
        for s in plan.stale_states:
            tj.remove_tree(tj.state_dir(path, s))
        tj.clean_temp_states(path)
        if job.start == 0 and 0 not in tj.existing_states(path):
            _save_state(MemorySystem(self.client), path, 0)
        done = self._recover_summaries(job, meta)
        ms = MemorySystem.load(tj.state_dir(path, job.start), self.client)
        await ms.ensure_index()
        return ms, done, meta.get("started_at") or started

    async def run(self, job: Job) -> JobResult:
        sample, path = job.sample, job.path
        res = JobResult(str(sample.id), job.action)
        started = _now()
        done: list[dict] = []
        calls_path = path / tj.CALLS_FILE
        try:
            ms, done, started = await self._open(job, started)
            for i in range(job.start, len(sample.sessions)):
                session = sample.sessions[i]
                result = await ms.build_session(session)
                if not result.applied:  # an agent call failed at the endpoint: nothing of the session is recorded
                    raise _NotBuilt("session {} not built ({})".format(session.id, "; ".join(
                        f"{a}: {r}" for a, r in result.blocking_failures.items())))
                lines = [tj.call_record(sample_id=str(sample.id), dataset=self.dataset, session_index=i,
                                        session_id=session.id, session_time=session.time, call=result.calls[a])
                         for a in AGENTS]
                done.append(_session_summary(i, session, result))
                meta = self._metadata(job, done, tj.STATUS_IN_PROGRESS, started)

                def persist() -> None:
                    # durability order: the session's call lines, then its state folder (see training/trajectories.py)
                    tj.append_jsonl(calls_path, lines)
                    _save_state(ms, path, i + 1)
                    tj.write_json(path / tj.METADATA_FILE, meta)

                await asyncio.to_thread(persist)  # fsyncs off the event loop: other dialogues go on meanwhile
                res.sessions_built += 1
                res.calls += len(lines)
                res.failed_calls += len(result.failures)
                if self.progress is not None:
                    self.progress.update(1)
        except Exception as exc:  # noqa: BLE001 - one sample's failure must not stop the others
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            log.debug("sample %s failed", sample.id, exc_info=True)
            log.error("sample %s stopped at session %d: %s (run again to resume)", sample.id, len(done), reason)
            if (path / tj.METADATA_FILE).is_file():
                tj.write_json(path / tj.METADATA_FILE,
                              self._metadata(job, done, tj.STATUS_IN_PROGRESS, started, reason))
            res.error = reason
            return res
        tj.write_json(path / tj.METADATA_FILE, self._metadata(job, done, tj.STATUS_COMPLETE, started))
        res.finished = True
        return res


async def run_jobs(jobs: list[Job], generator: Generator, workers: int) -> list[JobResult]:
    sem = asyncio.Semaphore(max(1, workers))

    async def one(job: Job) -> JobResult:
        if job.action == "skip":
            return JobResult(str(job.sample.id), "skip", finished=True)
        async with sem:
            return await generator.run(job)

    try:
        return list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        await generator.client.aclose()


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="longmemeval",
                   help="longmemeval (the paper trains on it), locomo, perltqa, demo or dialogues")
    d.add_argument("--dataset-path", help="the dataset file (default: looked up under --data-dir)")
    d.add_argument("--data-dir", default="data", help="folder holding the datasets and the LongMemEval splits")
    d.add_argument("--split", help="LongMemEval split: sft, rl or test (default: every selected instance)")
    d.add_argument("--sample-id", nargs="+", action="extend", help="only these sample ids (LongMemEval question ids)")
    d.add_argument("--conv-id", nargs="+", action="extend", help="LoCoMo conversation ids (same as --sample-id)")
    d.add_argument("--subset-file", help="file of sample ids (JSON list or one per line)")
    d.add_argument("--sessions", type=int, help="only the first N sessions of each sample (smoke runs)")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="expert_trajectories", help="root of <dataset>/<sample_id>/ folders")
    o.add_argument("--skip-existing", action="store_true", help="skip dialogues that are already finished")
    m = p.add_argument_group("expert model")
    m.add_argument("--provider", default="openai", choices=AVAILABLE_PROVIDERS)
    m.add_argument("--expert-model", default=config.SFT_EXPERT_MODEL)
    m.add_argument("--base-url", help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL / VLLM_BASE_URL)")
    m.add_argument("--api-key", help="default: OPENAI_API_KEY / VLLM_API_KEY")
    m.add_argument("--max-in-flight", type=int, default=config.DEFAULT_MAX_IN_FLIGHT, help="requests in flight")
    add_call_budget_args(m, ("builder", "compress"))
    m.add_argument("--cache-dir", help="on-disk response cache")
    e = p.add_argument_group("embeddings")
    e.add_argument("--embedding-provider", choices=("openai", "offline"),
                   help="default: offline with --provider offline, else openai")
    e.add_argument("--embedding-model", help=f"default {config.EMBEDDING_MODEL} (openai)")
    e.add_argument("--embedding-base-url")
    e.add_argument("--embedding-api-key")
    r = p.add_argument_group("run")
    r.add_argument("--allow-test-split", action="store_true",
                   help="allow held-out LongMemEval test instances (refused by default: they are the evaluation set)")
    r.add_argument("--parallel", action="store_true", help="run samples concurrently")
    r.add_argument("--workers", type=int, default=4, help="samples in flight with --parallel (default 4)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--verbose", action="store_true")
    return p


def _load_samples(args) -> list:
    from eval.datasets import DatasetError, load_dataset

    ids = (args.sample_id or []) + (args.conv_id or [])
    try:
        samples = load_dataset(args.dataset, data_dir=args.data_dir, split=args.split, sample_ids=ids or None,
                               subset_file=args.subset_file, dataset_path=args.dataset_path)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    if not samples:
        raise UserError("no samples selected")
    try:
        tj.refuse_test_split(((s.dataset, s.id) for s in samples), args.allow_test_split, "selected instance")
    except tj.TrajectoryError as exc:
        raise UserError(str(exc)) from None
    if args.sessions is not None:
        if args.sessions < 1:
            raise UserError("--sessions must be at least 1")
        for s in samples:
            s.sessions = s.sessions[: args.sessions]
    names: dict[str, str] = {}
    for s in samples:
        name = tj.safe_name(s.id)
        if name in names and names[name] != s.id:
            raise UserError(f"sample ids {names[name]!r} and {s.id!r} map to the same folder name {name!r}")
        names[name] = s.id
    return samples


def _make_client(args) -> LLMClient:
    try:
        return LLMClient(ClientSettings(
            provider=args.provider, model=args.expert_model, base_url=args.base_url, api_key=args.api_key,
            embedding_provider=args.embedding_provider, embedding_model=args.embedding_model,
            embedding_base_url=args.embedding_base_url, embedding_api_key=args.embedding_api_key,
            max_in_flight=args.max_in_flight, cache_dir=args.cache_dir, **call_budget(args)))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _print_summary(results: list[JobResult], jobs: list[Job], elapsed: float, client: LLMClient, out: Path) -> None:
    built = [r for r in results if r.action != "skip"]
    print(f"\nExpert trajectories -> {out}")
    print(f"  dialogues: {len(results)} selected, {sum(r.finished for r in built)} generated/resumed to the end, "
          f"{sum(r.action == 'skip' for r in results)} skipped (finished), {sum(r.error is not None for r in results)} "
          f"stopped by errors")
    print(f"  sessions built: {sum(r.sessions_built for r in results)}   agent calls: {sum(r.calls for r in results)} "
          f"(failed: {sum(r.failed_calls for r in results)})   time: {elapsed:.1f}s")
    print(f"  expert: {client.settings.provider}/{client.model}   embeddings: {client.settings.embedding_provider}/"
          f"{client.settings.embedding_model}")
    usage = client.usage.snapshot()
    for task, u in usage.items():
        print(f"  {task:18s} calls {u['calls']:6d}  failures {u['failures']:4d}  retries {u['retries']:4d}  "
              f"tokens {u['prompt_tokens']}+{u['completion_tokens']}")
    for r in results:
        if r.error:
            print(f"  ! {r.sample_id}: {r.error}")


def main(argv: list[str] | None = None) -> int:
    return tj.cli_exit(lambda: _main(argv))


async def _preflight(client: LLMClient) -> None:
    try:
        await client.preflight(chat=True, embeddings=True)
    finally:
        await client.aclose()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, level=logging.INFO, timestamps=True)
    from llm_client import LLMFatalError
    from memory_store import FolderLock, StoreError, check_output_dir

    try:
        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        samples = _load_samples(args)
        client = _make_client(args)
        settings = _settings_of(client)
        out_root = Path(args.output_dir)
        check_output_dir(out_root / args.dataset, "--output-dir")
        lock = FolderLock(out_root / args.dataset, what="trajectory folder").acquire()
    except (UserError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            jobs = [plan_job(s, out_root, args.dataset, settings, args.skip_existing) for s in samples]
            if any(j.action != "skip" for j in jobs):
                asyncio.run(_preflight(client))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except LLMFatalError as exc:
            print(f"error: expert endpoint: {exc.reason}; check --api-key / OPENAI_API_KEY, --base-url and "
                  "--expert-model (embeddings: --embedding-base-url, --embedding-api-key)", file=sys.stderr)
            return 2
        for j in jobs:
            if j.note:
                log.info("%s: %s", j.sample.id, j.note)
        from tqdm import tqdm

        todo = sum(len(j.sample.sessions) - j.start for j in jobs if j.action != "skip")
        t0 = time.perf_counter()
        with tqdm(total=todo, desc="sessions", unit="session", disable=True if args.no_progress else None) as bar:
            gen = Generator(client, args.dataset, settings, progress=bar)
            results = asyncio.run(run_jobs(jobs, gen, args.workers if args.parallel else 1))
        _print_summary(results, jobs, time.perf_counter() - t0, client, out_root / args.dataset)
        return 1 if any(r.error for r in results) else 0
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
