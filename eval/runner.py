"""Build memory, answer and judge: `python -m eval.runner --dataset demo --provider offline`.

Samples run concurrently (`--parallel --workers N`), the sessions of one sample in order with their four agents
together, and questions concurrently (`--concurrency C`). Memory is saved after every session and answers and
verdicts are appended as they finish, so a rerun with the same `--db-path` / `--output-dir` resumes where the last
one stopped and retries what failed. Before any work, one tiny request per endpoint checks keys, models and hosts.

Failures: an LLM call is retried within one budget (attempts and a deadline), then recorded. A session whose agent
call failed at the endpoint (transport, timeout, context, auth) is not applied: the sample stops there, its
questions are recorded as failed, and a rerun resumes at that session. An agent whose output stayed invalid is the
model's own result: its actions are a no-op for that session (as the RL validity gate does) and it is counted.

Exit codes: 0 every selected session and question finished; 1 finished with recorded failures (a rerun retries
them); 2 a user error (one line); 130 interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import config
from eval import metrics
from eval.datasets import DATASETS, DatasetError, Question, Sample, load_dataset
from eval.llm_judge import JUDGE_PROTOCOLS, judge_answer
from eval.report_html import write_report_html
from llm_client import (AVAILABLE_PROVIDERS, ClientSettings, LLMCallError, LLMClient, LLMFatalError,
                        add_call_budget_args, call_budget, configure_logging, http_backend, merge_usage,
                        usage_by_stage)
from memory_store import (MemoryStoreError, SessionLog, StoreError, append_jsonl, atomic_write_text,
                          check_output_dir, locked, read_faiss_index, read_jsonl_records, read_memory_file)
import http_workers
from memory_system import INDEX_FILE, MEMORY_FILE, MemorySystem

log = logging.getLogger("eval.runner")

ANSWERS_FILE = "answers.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
SUMMARY_FILE = "summary.json"
BUILD_FILE = "build.json"
LEDGER_FILE = "ledger.jsonl"  # one line per invocation of a run folder (and, for builds, of a memory folder)
MODES = ("build", "answer", "full")


class UsageError(Exception):
    """A user error: reported as one line, exit code 2."""


# --------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m eval.runner", description="Build long-term memory, answer and judge.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, choices=DATASETS)
    d.add_argument("--data-dir", default="data", help="folder holding the downloaded benchmarks (default: data)")
    d.add_argument("--dataset-path", help="a dataset file to read instead of the default one under --data-dir")
    d.add_argument("--conv-id", nargs="+", help="LoCoMo conversation ids (e.g. conv-26)")
    d.add_argument("--sample-id", nargs="+", help="sample ids (LongMemEval question ids, demo/dialogue ids)")
    d.add_argument("--character-id", nargs="+", help="PerLTQA protagonist names")
    d.add_argument("--split", choices=("sft", "rl", "test"), help="LongMemEval split (MemBuilder's splits file)")
    d.add_argument("--subset-file", help="a file of sample ids to keep (one per line, or a JSON list)")
    d.add_argument("--sessions", type=int, help="build at most the first N sessions of each sample")
    d.add_argument("--questions", type=int, help="answer the first N questions of each sample (after "
                                                 "--questions-in-built-sessions)")
    d.add_argument("--questions-in-built-sessions", action="store_true",
                   help="keep only the questions whose evidence lies in the sessions selected for building (LoCoMo "
                        "'evidence', LongMemEval 'answer_session_ids'); with --sessions N, the first N sessions")
    m = p.add_argument_group("models")
    m.add_argument("--mode", choices=MODES, default="full", help="build memory, answer from built memory, or both")
    m.add_argument("--provider", choices=AVAILABLE_PROVIDERS, default="offline",
                   help="provider of the builder (and answerer unless --answer-provider); default offline")
    m.add_argument("--model", help="memory-building model; also the answer model unless --answer-model "
                                   f"(default {config.ANSWER_MODEL})")
    m.add_argument("--base-url", help="OpenAI-compatible base URL for --provider")
    m.add_argument("--api-key", help="API key for --provider (default: OPENAI_API_KEY)")
    m.add_argument("--answer-provider", choices=AVAILABLE_PROVIDERS, help="provider for answering (default --provider)")
    m.add_argument("--answer-model", help="answer model (default --model)")
    m.add_argument("--answer-base-url", help="base URL for --answer-provider (default --base-url when the same provider)")
    m.add_argument("--answer-api-key", help="API key for --answer-provider (default --api-key when the same provider)")
    m.add_argument("--judge-provider", choices=AVAILABLE_PROVIDERS,
                   help="judge provider (default --provider; openai when --provider is vllm)")
    m.add_argument("--judge-model", default=None, help=f"judge model (default {config.JUDGE_MODEL})")
    m.add_argument("--judge-base-url", help="base URL for the judge (default --base-url when the same provider)")
    m.add_argument("--judge-api-key", help="API key for the judge")
    m.add_argument("--judge-protocol", choices=tuple(JUDGE_PROTOCOLS), default="paper")
    m.add_argument("--embedding-provider", choices=("openai", "offline"),
                   help="embeddings from an OpenAI-compatible endpoint or the local MiniLM (default: offline for "
                        "--provider offline, else openai)")
    m.add_argument("--embedding-model", help=f"embedding model (default {config.EMBEDDING_MODEL})")
    m.add_argument("--embedding-base-url", help="embeddings endpoint (default OPENAI_EMBEDDINGS_BASE_URL)")
    m.add_argument("--embedding-api-key", help="API key for --embedding-base-url (default OPENAI_EMBEDDINGS_API_KEY)")
    r = p.add_argument_group("memory and run")
    r.add_argument("--top-k", type=int, default=config.QA_ANSWERING_TOP_K, help="entries retrieved per question")
    r.add_argument("--db-path", help="memory folder (default memory_db/<dataset>-<provider>-<model>)")
    r.add_argument("--vector-store", choices=("faiss",), default="faiss")
    r.add_argument("--concurrency", type=int, default=8, help="questions answered and judged at once")
    r.add_argument("--parallel", action="store_true", help="build samples concurrently")
    r.add_argument("--workers", type=int, default=4, help="samples built at once with --parallel")
    r.add_argument("--no-lookahead", action="store_true",
                   help="embed each session's retrieval query and each question on its own, in its own round trip "
                        "(as the paper's release does), instead of in batched requests ahead; same results")
    r.add_argument("--max-in-flight", type=int, help="LLM requests in flight per endpoint "
                                                     "(default max(32, 4 x workers, 3 x concurrency))")
    add_call_budget_args(r, ("builder", "compress", "answer", "judge"))
    r.add_argument("--cache-dir", help="on-disk response cache: a rerun of the same requests costs nothing")
    r.add_argument("--output-dir", help="run folder (default runs/<dataset>-<answer provider>-<answer model>)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--verbose", action="store_true")
    return p


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


@dataclass
class RunConfig:
    args: argparse.Namespace
    builder: ClientSettings
    answerer: ClientSettings
    judge: ClientSettings
    db_path: Path
    output_dir: Path


def resolve(args: argparse.Namespace) -> RunConfig:
    for flag in ("concurrency", "workers", "top_k"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        budget = call_budget(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag in ("sessions", "questions"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    workers = args.workers if args.parallel else 1
    in_flight = args.max_in_flight or max(32, 4 * workers, 3 * args.concurrency)
    common = dict(max_in_flight=in_flight, cache_dir=args.cache_dir, embedding_provider=args.embedding_provider,
                  embedding_model=args.embedding_model, embedding_base_url=args.embedding_base_url,
                  embedding_api_key=args.embedding_api_key, **budget)
    default_model = config.OFFLINE_MODEL_NAME if args.provider == "offline" else config.ANSWER_MODEL
    builder = ClientSettings(provider=args.provider, model=args.model or default_model, base_url=args.base_url,
                             api_key=args.api_key, **common)
    ans_provider = args.answer_provider or args.provider
    same = ans_provider == args.provider
    answerer = ClientSettings(provider=ans_provider,
                              model=args.answer_model or (args.model if same and args.model else config.ANSWER_MODEL),
                              base_url=args.answer_base_url or (args.base_url if same else None),
                              api_key=args.answer_api_key or (args.api_key if same else None), **common)
    judge_provider = args.judge_provider or ("openai" if args.provider == "vllm" else args.provider)
    jsame = judge_provider == args.provider
    judge = ClientSettings(provider=judge_provider, model=args.judge_model or config.JUDGE_MODEL,
                           base_url=args.judge_base_url or (args.base_url if jsame else None),
                           api_key=args.judge_api_key or (args.api_key if jsame else None), **common)
    try:
        builder, answerer, judge = builder.resolved(), answerer.resolved(), judge.resolved()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    db_path = Path(args.db_path or f"memory_db/{args.dataset}-{_safe(builder.provider)}-{_safe(builder.model)}")
    output_dir = Path(args.output_dir or f"runs/{args.dataset}-{_safe(answerer.provider)}-{_safe(answerer.model)}")
    return RunConfig(args, builder, answerer, judge, db_path, output_dir)


# --------------------------------------------------------------------------- JSONL journal

def read_jsonl(path: Path) -> list[dict]:
    """Complete records of a journal; a torn last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping an incomplete line", path)
    return out


class Journal:
    """An append-only JSONL file of records keyed by question id; the last record of a key wins."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        for rec in read_jsonl(path):
            if isinstance(rec, dict) and isinstance(rec.get("question_id"), str):
                self.records[rec["question_id"]] = rec
        # Rewrite without torn or superseded lines so appends start on a clean line.
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))
        self._fh = open(path, "a", encoding="utf-8")
        self._lock = asyncio.Lock()

    async def put(self, rec: dict) -> None:
        # Flushed at once, so a killed process loses nothing finished; fsync (power loss) runs off the event loop.
        async with self._lock:
            self.records[rec["question_id"]] = rec
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._fh.flush()
            self._dirty = True

    async def sync(self) -> None:
        if getattr(self, "_dirty", False):
            self._dirty = False
            await asyncio.to_thread(os.fsync, self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


# --------------------------------------------------------------------------- progress

class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def bar(self, name: str, total: int, desc: str):
        if self.enabled:
            from tqdm import tqdm

            self.bars[name] = tqdm(total=total, desc=desc, unit=name, dynamic_ncols=True, leave=True)
        return self

    def update(self, name: str, n: int = 1) -> None:
        if name in self.bars:
            self.bars[name].update(n)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


# --------------------------------------------------------------------------- build

@dataclass
class BuildStats:
    sessions_built: int = 0
    sessions_skipped: int = 0
    agent_calls: int = 0
    agent_failures: list[dict] = field(default_factory=list)  # endpoint failures: the session was not applied
    invalid_outputs: list[dict] = field(default_factory=list)  # the model's invalid output: a no-op, session applied
    sample_errors: dict[str, str] = field(default_factory=dict)  # samples stopped at a session, with the reason
    notes: int = 0
    wall_s: float = 0.0


def _sessions_to_build(sample: Sample, limit: int | None) -> list:
    return sample.sessions[:limit] if limit else list(sample.sessions)


def _sample_dir(rc: RunConfig, sample: Sample) -> Path:
    return rc.db_path / _safe(sample.id)


def _check_builder(ms: MemorySystem, rc: RunConfig, sample_id: str) -> None:
    done = ms.meta.get("sessions_done") or []
    prev = ms.meta.get("builder")
    now = {"provider": rc.builder.provider, "model": rc.builder.model}
    if done and prev and prev != now:
        raise UsageError(f"memory for {sample_id} in {rc.db_path} was built by {prev['provider']}/{prev['model']}, "
                         f"not {now['provider']}/{now['model']}: use another --db-path")


def _stop_reason(session_id: str, failures: dict[str, str]) -> str:
    agents = ", ".join(f"{a}: {r}" for a, r in failures.items())
    return f"session {session_id} not built ({agents})"


async def build_sample(sample: Sample, rc: RunConfig, builder: LLMClient, embedder: LLMClient, stats: BuildStats,
                       progress: Progress) -> MemorySystem:
    """Build the selected sessions not built yet, in order; stop at the first session that cannot be applied."""
    sdir = _sample_dir(rc, sample)
    if MemorySystem.exists(sdir):
        ms = MemorySystem.load(sdir, builder, embedder=embedder)
        _check_builder(ms, rc, sample.id)
        await ms.ensure_index()
    else:
        ms = MemorySystem(builder, embedder=embedder)
    ms.meta.update(sample_id=sample.id, dataset=sample.dataset,
                   builder={"provider": rc.builder.provider, "model": rc.builder.model},
                   embedding={"provider": rc.builder.embedding_provider, "model": rc.builder.embedding_model},
                   baseline=rc.builder.provider == "offline", sessions_total=len(sample.sessions))
    ms.meta.pop("stopped", None)
    ms.meta.pop("build_error", None)
    sessions = _sessions_to_build(sample, rc.args.sessions)
    done = set(ms.meta.get("sessions_done") or [])

    async def stop(session, reason: str, failures: dict[str, str] | None = None) -> MemorySystem:
        stats.sample_errors[sample.id] = reason
        ms.meta["stopped"] = {"session": session.id, "reason": reason, "agents": failures or {}}
        ms.meta["complete"] = False
        await asyncio.to_thread(ms.save, sdir)  # the sample's build is over for this run: compact its log
        log.error("sample %s stopped: %s", sample.id, reason)
        progress.update("session", len(sessions) - sessions.index(session))
        return ms

    todo = [x for x in sessions if x.id not in done]
    try:
        lookahead = {} if rc.args.no_lookahead else await session_query_vectors(ms, todo)
    except LLMCallError as exc:
        if not todo:
            raise
        return await stop(todo[0], f"session {todo[0].id} not built (embed.session: {exc.reason})")
    for session in sessions:
        if session.id in done:
            stats.sessions_skipped += 1
            progress.update("session")
            continue
        try:
            result = await ms.build_session(session, query_vector=lookahead.get(session.id))
        except LLMCallError as exc:  # embedding or compression failure: the state stays pre-session
            return await stop(session, f"session {session.id} not built ({exc.task or 'embeddings'}: {exc.reason})")
        stats.agent_calls += len(result.calls)
        if not result.applied:
            for agent, reason in result.blocking_failures.items():
                stats.agent_failures.append({"sample_id": sample.id, "session_id": session.id, "agent": agent,
                                             "reason": reason, "kind": result.failure_kinds.get(agent)})
            return await stop(session, _stop_reason(session.id, result.blocking_failures), result.blocking_failures)
        stats.sessions_built += 1
        stats.notes += len(result.notes)
        for agent, reason in result.invalid_agents.items():
            stats.invalid_outputs.append({"sample_id": sample.id, "session_id": session.id, "agent": agent,
                                          "reason": reason})
        ms.meta["complete"] = len(ms.meta["sessions_done"]) >= len(sample.sessions)
        # Appends what the session added (the next session waits for it; other samples go on).
        await asyncio.to_thread(ms.persist, sdir)
        progress.update("session")
    if todo or not MemorySystem.exists(sdir) or SessionLog(sdir).exists():
        await asyncio.to_thread(ms.save, sdir)  # compaction: memory.json + index.faiss whole, the log dropped
    return ms


async def session_query_vectors(ms: MemorySystem, sessions: Sequence) -> dict:
    """Every session's retrieval query embedded ahead, in batched requests: the query is the session's own text and
    never depends on memory, so this takes one round trip off each session's critical path. The first session of
    an empty memory searches nothing and needs none."""
    from memory_system import render_session

    need = sessions[1:] if not ms.state.entries else sessions
    if not need:
        return {}
    vecs = await ms.embedder.embed([render_session(x.messages) for x in need], task="embed.session")
    return {x.id: vecs[i] for i, x in enumerate(need)}


# --------------------------------------------------------------------------- provenance

def memory_provenance(sample: Sample, meta: dict | None, n_entries: int, core: str) -> dict:
    """Who built a sample's memory and how far, from its memory.json (None: there is no memory)."""
    if meta is None:
        return {"exists": False, "sessions_built": 0, "sessions_total": len(sample.sessions), "complete": False,
                "partial": True, "empty": True, "stopped": None, "builder": None, "baseline": None, "n_entries": 0}
    built = len(meta.get("sessions_done") or [])
    total = int(meta.get("sessions_total") or len(sample.sessions))
    b = meta.get("builder") or {}
    return {"exists": True, "builder": f"{b.get('provider')}/{b.get('model')}" if b else None,
            "baseline": bool(meta.get("baseline", b.get("provider") == "offline")),
            "embedding": (lambda e: f"{e.get('provider')}/{e.get('model')}" if e else meta.get("embedding_model"))(
                meta.get("embedding") if isinstance(meta.get("embedding"), dict) else None),
            "sessions_built": built, "sessions_total": total, "complete": built >= total, "partial": built < total,
            "empty": n_entries == 0 and not core.strip(), "n_entries": n_entries,
            "stopped": meta.get("stopped") or (
                {"session": None, "reason": meta["build_error"]} if meta.get("build_error") else None),
            "invalid_agent_outputs": sum(len(v) for v in (meta.get("session_failures") or {}).values())}


def provenance_summary(samples: Sequence[Sample], per_sample: dict[str, dict], rc: RunConfig) -> dict:
    builders = sorted({p["builder"] for p in per_sample.values() if p.get("builder")})
    partial = [s.id for s in samples if per_sample.get(s.id, {}).get("partial")]
    empty = [s.id for s in samples if per_sample.get(s.id, {}).get("empty")]
    stopped = [s.id for s in samples if per_sample.get(s.id, {}).get("stopped")]
    warnings = []
    if stopped:
        warnings.append(f"{len(stopped)} sample(s) stopped at a session that could not be built "
                        f"(e.g. {stopped[0]}: {per_sample[stopped[0]]['stopped']['reason']}); their questions are "
                        "failed, not answered: rerun to resume")
    if partial:
        p0 = per_sample[partial[0]]
        warnings.append(f"{len(partial)} sample(s) answered from a partial memory (e.g. {partial[0]}: "
                        f"{p0['sessions_built']} of {p0['sessions_total']} sessions built)")
    if empty:
        warnings.append(f"{len(empty)} sample(s) have an empty memory (no entries, no core), e.g. {empty[0]}")
    return {"builder": builders, "baseline_builder": any(p.get("baseline") for p in per_sample.values()),
            "db_path": str(rc.db_path), "sessions_built": sum(p["sessions_built"] for p in per_sample.values()),
            "sessions_total": sum(p["sessions_total"] for p in per_sample.values()),
            "partial": partial, "empty": empty, "stopped": stopped, "samples": per_sample, "warnings": warnings}


# --------------------------------------------------------------------------- answer and judge

def _answer_record(sample: Sample, q: Question) -> dict:
    return {"sample_id": sample.id, "question_id": q.id, "question": q.text, "gold": q.answer, "type": q.type,
            "category": q.category, "category_name": q.category_name}


async def answer_question(sample: Sample, q: Question, ms: MemorySystem | None, rc: RunConfig, answerer: LLMClient,
                          judge: LLMClient, answers: Journal, judgments: Journal, sem: asyncio.Semaphore,
                          build_error: str | None, query_vector=None) -> None:
    async with sem:
        rec = _answer_record(sample, q)
        prev = answers.records.get(q.id)
        if prev and not prev.get("error"):
            rec = prev
        elif ms is None or build_error:
            rec.update(answer=None, error=f"memory incomplete: {build_error or 'no memory'}; rerun to resume the build",
                       retrieved_ids=[], retrieved_types=[], retrieved_scores=[])
            await answers.put(rec)
        else:
            t0 = time.perf_counter()
            try:
                if isinstance(query_vector, LLMCallError):
                    raise query_vector
                retrieved = await ms.retrieve(q.text, rc.args.top_k, query_vector=query_vector)
                res = await ms.answer(q.text, answerer, current_time=sample.current_time, retrieved=retrieved)
                rec.update(answer=res.answer, retrieved_ids=[r.entry.id for r in res.retrieved],
                           retrieved_types=[r.entry.type for r in res.retrieved],
                           retrieved_scores=[round(r.score, 4) for r in res.retrieved], answer_model=res.model,
                           answer_truncated=res.finish_reason == "length",
                           latency_s=round(time.perf_counter() - t0, 3), error=None)
            except LLMCallError as exc:
                rec.update(answer=None, retrieved_ids=[], retrieved_types=[], retrieved_scores=[],
                           answer_model=answerer.model, error=f"answer: {exc.reason}")
            await answers.put(rec)
        if rec.get("error"):
            return
        prev_j = judgments.records.get(q.id)
        if prev_j and prev_j.get("label") and prev_j.get("answer") == rec["answer"] and \
                prev_j.get("protocol") == rc.args.judge_protocol and \
                prev_j.get("judge") in (None, f"{judge.provider}/{judge.model}"):
            return  # a verdict of this answer by this judge and protocol exists; another judge asks again
        v = await judge_answer(judge, rc.args.judge_protocol, question=q.text, gold=q.answer, answer=rec["answer"],
                               question_type=q.type, abstention=bool(q.extra.get("abstention")),
                               also_correct=q.extra.get("original_answer"))
        await judgments.put({"sample_id": sample.id, "question_id": q.id, "label": v.label, "judge_model": v.model,
                             "judge": f"{judge.provider}/{judge.model}",
                             "protocol": v.protocol, "answer": rec["answer"],
                             "error": f"judge: {v.error}" if v.error else None})


async def question_vectors(embedder: LLMClient, qs: Sequence[Question], answers: Journal) -> dict:
    """The retrieval embeddings of the questions still to answer, in batched requests ahead of answering (one
    round trip fewer per question). A failed batch is handed to each question as its error."""
    todo = [q for q in qs if (answers.records.get(q.id) or {}).get("error", True)]
    if not todo:
        return {}
    try:
        vecs = await embedder.embed([q.text for q in todo], task="embed.query")
    except LLMCallError as exc:
        return {q.id: exc for q in todo}
    return {q.id: vecs[i] for i, q in enumerate(todo)}


# --------------------------------------------------------------------------- ledger

def read_ledger(folder: Path) -> list[dict]:
    return [r for r in read_jsonl_records(folder / LEDGER_FILE) if isinstance(r.get("usage"), dict)]


def ledger_totals(records: Sequence[dict]) -> dict:
    return {"invocations": len(records), "usage": usage_by_stage(merge_usage(*(r["usage"] for r in records))),
            "wall_s": round(sum(float(r.get("wall_s") or 0) for r in records), 3)}


def _ledger_brief(r: dict) -> dict:
    u = merge_usage(r.get("usage") or {})
    return {"invocation": r.get("invocation"), "started_at": r.get("started_at"), "mode": r.get("mode"),
            "wall_s": r.get("wall_s"), "exit_code": r.get("exit_code"), "counts": r.get("counts"),
            "requests": sum(x["requests"] for x in u.values()),
            "tokens": sum(x["prompt_tokens"] + x["completion_tokens"] for x in u.values())}


# --------------------------------------------------------------------------- orchestration

def _merge_records(samples: Sequence[Sample], answers: Journal, judgments: Journal, limit: int | None) -> list[dict]:
    out = []
    for s in samples:
        for q in (s.questions[:limit] if limit else s.questions):
            a = answers.records.get(q.id) or {}
            j = judgments.records.get(q.id) or {}
            error = a.get("error") or j.get("error") or (None if j.get("label") else "not judged")
            out.append({**_answer_record(s, q), "also_correct": q.extra.get("original_answer"),
                        "prediction": a.get("answer"), "label": j.get("label"),
                        "failed": bool(error), "failure_reason": error,
                        "retrieved": len(a.get("retrieved_ids") or [])})
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _endpoints(rc: RunConfig) -> list[tuple[str, ClientSettings, bool, bool]]:
    """(role, settings, check chat, check embeddings) for the endpoints this mode will call."""
    mode = rc.args.mode
    out = []
    if mode in ("build", "full"):
        out.append(("builder", rc.builder, True, True))
    if mode in ("answer", "full"):
        if mode == "answer":
            out.append(("embeddings", rc.builder, False, True))
        out.append(("answer", rc.answerer, True, False))
        out.append(("judge", rc.judge, True, False))
    return out


_FLAGS = {"builder": ("--api-key", "--base-url", "--model"), "answer": ("--answer-api-key", "--answer-base-url",
                                                                     "--answer-model"),
          "judge": ("--judge-api-key", "--judge-base-url", "--judge-model"),
          "embeddings": ("--embedding-api-key", "--embedding-base-url", "--embedding-model")}


def fatal_hint(role: str, exc: LLMCallError) -> str:
    key, url, model = _FLAGS.get(role, _FLAGS["builder"])
    if exc.kind == "auth":
        env = "OPENAI_EMBEDDINGS_API_KEY or OPENAI_API_KEY" if role == "embeddings" else "OPENAI_API_KEY"
        return f"set {env} or pass {key} (or point {url} at a server that needs no key)"
    if exc.kind == "model":
        return f"check {model} (a model the server serves) and that {url} ends in /v1"
    if exc.kind == "unreachable":
        return f"check {url} (is the server running and reachable?)"
    return f"check {url}, {model} and {key}"


async def preflight(rc: RunConfig, clients: dict[str, LLMClient]) -> None:
    """One tiny request per distinct endpoint; LLMFatalError (with the role) on the first that cannot work."""
    seen: set[tuple] = set()
    for role, s, chat, emb in _endpoints(rc):
        client = clients[role]
        keys = []
        if chat and s.provider != "offline":
            keys.append(("chat", s.chat_endpoint(), s.api_key, s.model))
        if emb and s.embedding_provider != "offline":
            keys.append(("embed", s.embedding_endpoint(), s.embedding_api_key, s.embedding_model))
        for key in keys:
            if key in seen:
                continue
            seen.add(key)
            try:
                await client.preflight(chat=key[0] == "chat", embeddings=key[0] == "embed")
            except LLMFatalError as exc:
                exc.role = "embeddings" if key[0] == "embed" else role  # type: ignore[attr-defined]
                raise


def _warn_public_judge(rc: RunConfig) -> str | None:
    j = rc.judge
    if j.provider == "openai" and not j.base_url and (rc.builder.base_url or rc.answerer.base_url) \
            and rc.args.mode != "build":
        return (f"the judge ({j.model}) goes to the public OpenAI API while the builder/answerer use "
                f"{rc.builder.base_url or rc.answerer.base_url}: pass --judge-base-url to keep it there")
    return None


@contextlib.contextmanager
def _few_collections():
    """Fewer, cheaper garbage collections while the stages run. Thousands of requests a second allocate millions of
    short-lived objects: at the default thresholds (700, 10, 10) the collector ran ~1,000 times in a 2,000-question
    run and, with the loaded data and the SDK's types in the scanned generations, took ~20% of the event loop's CPU.
    What exists before the stages (and each loaded memory) is frozen out of the scans; the young
    generation collects every 50,000 allocations. Restored afterwards (tests run many runs in one process)."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _cpu_now() -> float:
    """CPU seconds of this process and of its HTTP worker processes (--client-processes) so far."""
    return time.process_time() + http_workers.workers_cpu_s()


async def run(rc: RunConfig, samples: list[Sample], invocation: dict) -> dict:
    args = rc.args
    progress = Progress(not args.no_progress)
    builder = LLMClient(rc.builder)
    # Retrieval must embed questions with the model that embedded the memory: one embedder for both stages.
    embedder = builder
    answerer = LLMClient(rc.answerer)
    judge = LLMClient(rc.judge)
    clients = {"builder": builder, "embeddings": builder, "answer": answerer, "judge": judge}
    invocation["clients"] = clients
    answers = judgments = None
    stats = BuildStats()
    timing: dict[str, float] = {}
    t_start = time.perf_counter()
    memories: dict[str, MemorySystem | None] = {}
    try:
        await preflight(rc, clients)
        timing["preflight_s"] = round(time.perf_counter() - t_start, 3)
        n_sessions = sum(len(_sessions_to_build(s, args.sessions)) for s in samples)
        n_questions = sum(len(s.questions[: args.questions] if args.questions else s.questions) for s in samples)
        if args.mode in ("build", "full"):
            progress.bar("session", n_sessions, "build")
        if args.mode in ("answer", "full"):
            answers = Journal(rc.output_dir / ANSWERS_FILE)
            judgments = Journal(rc.output_dir / JUDGMENTS_FILE)
            progress.bar("question", n_questions, "answer+judge")
        qsem = asyncio.Semaphore(args.concurrency)
        wsem = asyncio.Semaphore(args.workers if args.parallel else 1)
        build_spans: list[tuple[float, float]] = []  # (start, end) per sample, to report each stage's wall time
        qa_spans: list[tuple[float, float]] = []
        cpu_marks: dict[str, float] = {}  # CPU of this process and its workers at each stage's first start, last end

        async def one_sample(sample: Sample) -> None:
            ms: MemorySystem | None = None
            qs = sample.questions[: args.questions] if args.questions else sample.questions
            # In a full run the questions' embeddings are fetched while the memory builds: off the critical path.
            ahead = asyncio.create_task(question_vectors(embedder, qs, answers)) \
                if args.mode == "full" and not args.no_lookahead else None
            try:
                if args.mode in ("build", "full"):
                    async with wsem:
                        t0 = time.perf_counter()
                        cpu_marks.setdefault("build_start", _cpu_now())
                        ms = await build_sample(sample, rc, builder, embedder, stats, progress)
                        build_spans.append((t0, time.perf_counter()))
                        cpu_marks["build_end"] = _cpu_now()
                if args.mode == "build":
                    memories[sample.id] = ms
                    return
                await answer_sample(sample, ms, qs, ahead)
            finally:
                if ahead is not None:  # unused when the build stopped or left no entries
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)

        async def answer_sample(sample: Sample, ms: MemorySystem | None, qs: Sequence[Question],
                                ahead: asyncio.Task | None) -> None:
            if ms is None:
                ms = await asyncio.to_thread(MemorySystem.load, _sample_dir(rc, sample), None, embedder=embedder)
                await ms.ensure_index()
                gc.freeze()  # a loaded memory lives as long as the run: out of the collector's scans
            memories[sample.id] = ms
            stopped = ms.meta.get("stopped") or ({"reason": ms.meta["build_error"]} if ms.meta.get("build_error")
                                                 else None)
            build_error = stats.sample_errors.get(sample.id) or (stopped or {}).get("reason")
            t0 = time.perf_counter()
            cpu_marks.setdefault("answer_judge_start", _cpu_now())
            if build_error or not ms.state.entries or args.no_lookahead:
                qvecs = {}  # nothing to retrieve from (the questions are recorded failed, or answered from no memory)
            elif ahead is not None:
                qvecs = await ahead
            else:
                qvecs = await question_vectors(embedder, qs, answers)

            async def q_task(q: Question) -> None:
                await answer_question(sample, q, ms, rc, answerer, judge, answers, judgments, qsem, build_error,
                                      qvecs.get(q.id))
                progress.update("question")

            await asyncio.gather(*(q_task(q) for q in qs))
            await answers.sync()
            await judgments.sync()
            qa_spans.append((t0, time.perf_counter()))
            cpu_marks["answer_judge_end"] = _cpu_now()

        with _few_collections():
            await asyncio.gather(*(one_sample(s) for s in samples))
        timing["total_s"] = round(time.perf_counter() - t_start, 3)
        # Samples overlap (a sample is answered while others still build), so each stage reports its wall span
        # from its first start to its last end, and the sum of per-sample times beside it.
        for stage, spans in (("build", build_spans), ("answer_judge", qa_spans)):
            if spans:
                timing[f"{stage}_wall_s"] = round(max(e for _, e in spans) - min(b for b, _ in spans), 3)
                timing[f"{stage}_s_sum_over_samples"] = round(sum(e - b for b, e in spans), 3)
                timing[f"{stage}_cpu_s"] = round(cpu_marks[f"{stage}_end"] - cpu_marks[f"{stage}_start"], 3)
    finally:
        progress.close()
        for j in (answers, judgments):
            if j is not None:
                j.close()
        for c in {id(x): x for x in (builder, answerer, judge)}.values():
            await c.aclose()

    stats.wall_s = timing.get("total_s", 0.0)
    per_sample = {}
    for s in samples:
        ms = memories.get(s.id)
        per_sample[s.id] = memory_provenance(s, ms.meta if ms is not None else None,
                                             len(ms.state.entries) if ms is not None else 0,
                                             ms.state.core if ms is not None else "")
    prov = provenance_summary(samples, per_sample, rc)
    build_summary = {
        "sessions_total": sum(len(_sessions_to_build(s, args.sessions)) for s in samples),
        "sessions_built": stats.sessions_built, "sessions_resumed": stats.sessions_skipped,
        "sessions_not_built": sum(len(_sessions_to_build(s, args.sessions)) - min(
            len(_sessions_to_build(s, args.sessions)), per_sample[s.id]["sessions_built"]) for s in samples),
        "agent_calls": stats.agent_calls, "agent_calls_failed": len(stats.agent_failures),
        "agent_failures": stats.agent_failures, "agent_outputs_invalid": len(stats.invalid_outputs),
        "invalid_outputs": stats.invalid_outputs, "samples_stopped": stats.sample_errors,
        "db_path": str(rc.db_path),
    } if args.mode in ("build", "full") else None
    builder_names = prov["builder"] or [f"{rc.builder.provider}/{rc.builder.model}"]
    models = {"builder": ", ".join(builder_names),
              "answer": f"{rc.answerer.provider}/{rc.answerer.model}",
              "judge": f"{rc.judge.provider}/{rc.judge.model}",
              "embedding": f"{rc.builder.embedding_provider}/{rc.builder.embedding_model}"}
    this_usage = merge_usage(*(c.usage.snapshot() for c in {id(x): x for x in (builder, answerer, judge)}.values()))
    invocation["usage"] = this_usage
    summary: dict[str, Any] = {}
    warnings = list(prov["warnings"])
    if args.mode in ("answer", "full"):
        records = _merge_records(samples, answers, judgments, args.questions)
        summary = metrics.summarize(records, dataset=args.dataset)
        summary["answered"] = sum(1 for r in records if r["prediction"] is not None)
        no_retrieval = [r["question_id"] for r in records if r["prediction"] is not None and not r["retrieved"]]
        if no_retrieval:
            warnings.append(f"{len(no_retrieval)} answered question(s) retrieved no memory entry")
        summary["questions_without_retrieval"] = len(no_retrieval)
        summary["judge_check"] = judge_lexical_check(records)
        jc = summary["judge_check"]
        if jc["flagged"]:
            warnings.append(f"the judge's verdicts disagree with the lexical metrics: {jc['with_no_shared_word']} of "
                            f"{jc['correct_with_specific_gold']} CORRECT answers share no word with their gold "
                            f"(over {int(100 * JUDGE_CHECK_THRESHOLD)}%): this accuracy is not a measurement")
        if rc.judge.provider != "offline" and any(
                f"{rc.judge.provider}/{rc.judge.model}" == b for b in builder_names):
            warnings.append(f"the judge {rc.judge.provider}/{rc.judge.model} is also the model that built the memory")
    if stats.invalid_outputs:
        warnings.append(f"{len(stats.invalid_outputs)} agent output(s) stayed invalid after their retries: those "
                        "agents' actions were dropped for their sessions (a no-op, as the paper's validity gate)")
    baseline = bool(prov["baseline_builder"]) or "offline" in {rc.answerer.provider, rc.judge.provider} \
        if args.mode != "build" else rc.builder.provider == "offline"
    summary.update({
        "dataset": args.dataset, "mode": args.mode, "n_samples": len(samples), "models": models,
        "judge": JUDGE_PROTOCOLS[args.judge_protocol], "judge_protocol": args.judge_protocol,
        "baseline": metrics.BASELINE_NOTE if baseline else False,
        "provenance": {**{k: v for k, v in prov.items() if k != "warnings"}, "models": models,
                       "judge_protocol": args.judge_protocol},
        "warnings": warnings,
        "build": build_summary, "timing": timing,
        "settings": {"top_k": args.top_k, "construction_top_k": config.MEMORY_CONSTRUCTION_TOP_K,
                     "concurrency": args.concurrency, "parallel": args.parallel,
                     "workers": args.workers if args.parallel else 1, "sessions": args.sessions,
                     "questions": args.questions, "vector_store": args.vector_store,
                     "max_retries": args.max_retries, "max_attempts_per_call": args.max_retries + 1,
                     "request_timeout_s": args.request_timeout, "call_deadline_s": args.call_deadline,
                     "max_tokens": rc.builder.max_tokens_by_task, "json_schema": rc.builder.json_schema,
                     "http_backend": http_backend()},
    })
    invocation["summary"] = summary
    return summary


def exit_code_of(summary: dict) -> int:
    b = summary.get("build") or {}
    prov = summary.get("provenance") or {}
    failed = (summary.get("n_failed") or 0) + len(prov.get("stopped") or []) + len(b.get("samples_stopped") or {})
    return 1 if failed else 0


def finish_outputs(rc: RunConfig, summary: dict, invocation: dict, code: int) -> dict:
    """Append this invocation to the ledgers, then write the summary with the totals over all invocations."""
    rec = {"invocation": invocation["id"], "started_at": invocation["started_at"], "ended_at": _now(),
           "argv": invocation["argv"], "mode": rc.args.mode, "wall_s": summary.get("timing", {}).get("total_s"),
           "exit_code": code, "usage": invocation.get("usage") or {},
           "counts": {k: v for k, v in {
               "sessions_built": (summary.get("build") or {}).get("sessions_built"),
               "samples_stopped": len((summary.get("build") or {}).get("samples_stopped") or {}),
               "questions": summary.get("n_questions"), "questions_failed": summary.get("n_failed")}.items()
               if v is not None}}
    append_jsonl(rc.output_dir / LEDGER_FILE, [rec])
    if rc.args.mode in ("build", "full") and (summary.get("build") or {}).get("sessions_built", 0) + \
            len((summary.get("build") or {}).get("samples_stopped") or {}):
        append_jsonl(rc.db_path / LEDGER_FILE, [{**rec, "output_dir": str(rc.output_dir)}])
    ledger = read_ledger(rc.output_dir)
    totals = ledger_totals(ledger)
    summary["usage"] = totals["usage"]  # {stage: {task: usage}} over every invocation of this run folder
    summary["usage_this_invocation"] = usage_by_stage(invocation.get("usage") or {})
    summary["invocations"] = [_ledger_brief(r) for r in ledger]
    summary["timing"]["all_invocations_s"] = totals["wall_s"]
    build_ledger = read_ledger(rc.db_path) if rc.db_path.is_dir() else []
    if build_ledger:
        summary["memory_build_usage"] = {**ledger_totals(build_ledger), "db_path": str(rc.db_path),
                                         "note": "every build invocation on this --db-path, wherever its run folder"}
    summary["exit_code"] = code
    if rc.args.mode == "build":
        atomic_write_text(rc.output_dir / BUILD_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        atomic_write_text(rc.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
        metrics.write_report(rc.output_dir, summary, title=f"MemBuilder evaluation: {rc.args.dataset}")
        write_report_html(rc.output_dir)
    return summary


def print_summary(summary: dict, rc: RunConfig) -> None:
    lines = [""]
    if summary.get("baseline"):
        lines.append("OFFLINE BASELINE (rule-based builder, extractive answerer, lexical judge): not an LLM result")
    lines.append(f"dataset {summary['dataset']}  mode {summary['mode']}  samples {summary['n_samples']}")
    b = summary.get("build")
    if b:
        lines.append(f"build: {b['sessions_built']} sessions built, {b['sessions_resumed']} resumed, "
                     f"{b['sessions_not_built']} not built; {b['agent_calls_failed']} of {b['agent_calls']} agent "
                     f"calls failed, {b['agent_outputs_invalid']} invalid; {len(b['samples_stopped'])} samples "
                     f"stopped  -> {b['db_path']}")
    prov = summary.get("provenance") or {}
    if summary["mode"] != "build":
        lines.append(f"memory: built by {summary['models']['builder']}, {prov.get('sessions_built')} of "
                     f"{prov.get('sessions_total')} sessions  ({prov.get('db_path')})")
    if "accuracy" in summary:
        ci = summary.get("accuracy_ci95")
        ci_txt = f" [95% CI {ci[0]}-{ci[1]}, {summary.get('ci_method')}]" if ci else ""
        lines.append(f"accuracy {summary['accuracy']}%{ci_txt} ({summary['n_correct']}/{summary['n_judged'] if 'n_judged' in summary else summary['n_questions'] - summary['n_failed']} judged, "
                     f"{summary['n_failed']} of {summary['n_questions']} failed)  judge {summary['models']['judge']} "
                     f"[{summary['judge_protocol']}]")
        if summary.get("without_adversarial"):
            lines.append(f"  without adversarial: {summary['without_adversarial'].get('accuracy')}%")
    for w in summary.get("warnings") or []:
        lines.append(f"WARNING: {w}")
    u = merge_usage(*(t for t in (summary.get("usage") or {}).values()))
    lines.append(f"cost over {len(summary.get('invocations') or [])} invocation(s): "
                 f"{sum(x['requests'] for x in u.values())} LLM requests, "
                 f"{sum(x['prompt_tokens'] + x['completion_tokens'] for x in u.values())} tokens")
    lines.append(f"wall time {summary['timing'].get('total_s')} s  -> {rc.output_dir}")
    if summary.get("exit_code") == 1:
        n_stop = len(prov.get("stopped") or (b or {}).get("samples_stopped") or {})
        lines.append(f"INCOMPLETE: {n_stop} sample(s) stopped, {summary.get('n_failed', 0)} question(s) failed "
                     "(reasons in summary.json): rerun the same command to retry them")
    print("\n".join(lines))


JUDGE_CHECK_THRESHOLD = 0.5  # share of CORRECT verdicts whose answer shares no word with a specific gold
JUDGE_CHECK_MIN = 5


def judge_lexical_check(records: Sequence[dict]) -> dict:
    """How often the judge's CORRECT verdicts are for answers that share no word with their (specific) gold: a
    judge that says CORRECT to unrelated answers is not measuring anything (e.g. a tiny model judging itself)."""
    from eval.metrics import expresses_unavailability, token_f1

    correct = [r for r in records if r.get("label") == "CORRECT" and not r.get("failed") and r.get("prediction")
               and r.get("gold") and not expresses_unavailability(r["gold"])]
    zero = [r["question_id"] for r in correct if token_f1(r["prediction"], r["gold"]) == 0.0]
    share = len(zero) / len(correct) if correct else None
    return {"correct_with_specific_gold": len(correct), "with_no_shared_word": len(zero),
            "share": round(share, 4) if share is not None else None, "threshold": JUDGE_CHECK_THRESHOLD,
            "flagged": bool(share is not None and len(correct) >= JUDGE_CHECK_MIN and share > JUDGE_CHECK_THRESHOLD),
            "examples": zero[:5]}


def evidence_sessions(sample: Sample, q: Question) -> set[str] | None:
    """The session ids holding a question's evidence, when the dataset says (None: it does not)."""
    if sample.dataset == "locomo":
        ids = {f"session_{m.group(1)}" for e in q.extra.get("evidence") or [] if (m := re.match(r"D(\d+):", str(e)))}
        return ids or None
    ids = q.extra.get("answer_session_ids")
    return set(map(str, ids)) if ids else None


def keep_questions_in_built_sessions(samples: Sequence[Sample], limit: int | None) -> tuple[int, int]:
    """Drop the questions whose evidence is not (or not known to be) in the sessions selected for building."""
    kept = total = 0
    for s in samples:
        built = {x.id for x in _sessions_to_build(s, limit)}
        total += len(s.questions)
        s.questions = [q for q in s.questions if (ev := evidence_sessions(s, q)) is not None and ev <= built]
        kept += len(s.questions)
    return kept, total


# --------------------------------------------------------------------------- checks before any work

def check_samples(samples: Sequence[Sample]) -> None:
    seen: dict[str, str] = {}
    for s in samples:
        folder = _safe(s.id)
        if folder in seen:
            if seen[folder] == s.id:
                raise UsageError(f"sample id {s.id!r} appears twice in the dataset: ids must be unique")
            raise UsageError(f"sample ids {seen[folder]!r} and {s.id!r} share the memory folder {folder!r}: "
                             "rename one of them")
        seen[folder] = s.id
    qids: dict[str, str] = {}
    for s in samples:
        for q in s.questions:
            if q.id in qids:
                raise UsageError(f"question id {q.id!r} appears twice (samples {qids[q.id]!r} and {s.id!r})")
            qids[q.id] = s.id


def check_store(rc: RunConfig, samples: Sequence[Sample]) -> None:
    """Every existing memory folder of the selection must be readable before any work starts."""
    for s in samples:
        sdir = _sample_dir(rc, s)
        if sdir.exists() and not sdir.is_dir():
            raise MemoryStoreError(f"{sdir} is not a folder: delete it (it should hold the memory of {s.id!r})")
        if not (sdir / MEMORY_FILE).exists():
            continue
        data = read_memory_file(sdir / MEMORY_FILE)
        index = sdir / INDEX_FILE
        if index.exists() and data["entries"]:
            idx = read_faiss_index(index)
            if idx.ntotal < len(data["entries"]):
                raise MemoryStoreError(f"{index} holds {idx.ntotal} vectors for {len(data['entries'])} entries: "
                                       f"delete {sdir} to rebuild that memory")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    invocation = {"id": uuid.uuid4().hex[:12], "started_at": _now(), "argv": argv}
    try:
        rc = resolve(args)
        samples = load_dataset(args.dataset, data_dir=args.data_dir, split=args.split,
                               sample_ids=args.sample_id or args.conv_id, subset_file=args.subset_file,
                               dataset_path=args.dataset_path, character_ids=args.character_id)
        if not samples:
            raise UsageError("no samples selected")
        check_samples(samples)
        if args.questions_in_built_sessions:
            kept, total = keep_questions_in_built_sessions(samples, args.sessions)
            print(f"questions whose evidence lies in the built sessions: {kept} of {total}", file=sys.stderr)
            if not kept:
                raise UsageError("--questions-in-built-sessions keeps no question: build more --sessions")
        if args.mode == "answer":
            if rc.db_path.exists() and not rc.db_path.is_dir():
                raise UsageError(f"--db-path {rc.db_path} is not a folder")
            missing = [s.id for s in samples if not MemorySystem.exists(_sample_dir(rc, s))]
            if missing:
                raise UsageError(f"no memory for {len(missing)} sample(s) under {rc.db_path} "
                                 f"(e.g. {missing[0]}): run --mode build first or pass the right --db-path")
        else:
            check_output_dir(rc.db_path, "--db-path")
        check_output_dir(rc.output_dir, "--output-dir")
        check_store(rc, samples)
        warn = _warn_public_judge(rc)
        if warn:
            print(f"warning: {warn}", file=sys.stderr)
        folders = [(rc.output_dir, True, "--output-dir")]
        folders += [(_sample_dir(rc, s), args.mode != "answer", "memory folder") for s in samples]
        invocation["rc"] = rc
        with locked(folders):
            summary = asyncio.run(run(rc, samples, invocation))
            code = exit_code_of(summary)
            finish_outputs(rc, summary, invocation, code)
    except LLMFatalError as exc:
        role = getattr(exc, "role", "builder")
        print(f"error: {role} endpoint: {exc.reason}; {fatal_hint(role, exc)}", file=sys.stderr)
        return 2
    except (UsageError, DatasetError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ledger_interrupted(invocation)
        print("interrupted: finished sessions and answers are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print_summary(summary, rc)
    return code


def _ledger_interrupted(invocation: dict) -> None:
    """What an interrupted invocation spent still goes into the ledger, so the run's totals stay true."""
    rc, clients = invocation.get("rc"), invocation.get("clients")
    if rc is None or not clients:
        return
    usage = merge_usage(*(c.usage.snapshot() for c in {id(x): x for x in clients.values()}.values()))
    try:
        append_jsonl(rc.output_dir / LEDGER_FILE, [{"invocation": invocation["id"], "started_at": invocation[
            "started_at"], "ended_at": _now(), "argv": invocation["argv"], "mode": rc.args.mode, "wall_s": None,
            "exit_code": 130, "usage": usage, "counts": {}}])
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
