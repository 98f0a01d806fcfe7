"""Build memory, answer and judge: `python -m eval.runner --dataset demo --provider offline`.

Samples run concurrently (`--parallel --workers N`), the sessions of one sample in order with their four agents
together, and questions concurrently (`--concurrency C`). Memory is saved after every session and answers and
verdicts are appended as they finish, so a rerun with the same `--db-path` / `--output-dir` resumes where the last
one stopped. LLM failures are retried, then recorded against their session or question; the run goes on.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import config
from eval import metrics
from eval.datasets import DATASETS, DatasetError, Question, Sample, load_dataset
from eval.llm_judge import JUDGE_PROTOCOLS, judge_answer
from llm_client import (AVAILABLE_PROVIDERS, ClientSettings, LLMCallError, LLMClient, atomic_write_text,
                        configure_logging)
from memory_system import MemoryStoreError, MemorySystem

log = logging.getLogger("eval.runner")

ANSWERS_FILE = "answers.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
SUMMARY_FILE = "summary.json"
BUILD_FILE = "build.json"
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
    d.add_argument("--questions", type=int, help="answer at most the first N questions of each sample")
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
    r = p.add_argument_group("memory and run")
    r.add_argument("--top-k", type=int, default=config.QA_ANSWERING_TOP_K, help="entries retrieved per question")
    r.add_argument("--db-path", help="memory folder (default memory_db/<dataset>-<provider>-<model>)")
    r.add_argument("--vector-store", choices=("faiss",), default="faiss")
    r.add_argument("--concurrency", type=int, default=8, help="questions answered and judged at once")
    r.add_argument("--parallel", action="store_true", help="build samples concurrently")
    r.add_argument("--workers", type=int, default=4, help="samples built at once with --parallel")
    r.add_argument("--max-in-flight", type=int, help="LLM requests in flight per endpoint "
                                                     "(default max(32, 4 x workers, 3 x concurrency))")
    r.add_argument("--max-retries", type=int, default=config.DEFAULT_MAX_RETRIES)
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
    for flag in ("sessions", "questions"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    workers = args.workers if args.parallel else 1
    in_flight = args.max_in_flight or max(32, 4 * workers, 3 * args.concurrency)
    common = dict(max_in_flight=in_flight, max_retries=args.max_retries, cache_dir=args.cache_dir,
                  embedding_provider=args.embedding_provider, embedding_model=args.embedding_model,
                  embedding_base_url=args.embedding_base_url)
    default_model = config.OFFLINE_MODEL_NAME if args.provider == "offline" else config.ANSWER_MODEL
    builder = ClientSettings(provider=args.provider, model=args.model or default_model, base_url=args.base_url,
                             api_key=args.api_key, **common)
    ans_provider = args.answer_provider or args.provider
    same = ans_provider == args.provider
    answerer = ClientSettings(provider=ans_provider,
                              model=args.answer_model or (args.model if same and args.model else config.ANSWER_MODEL),
                              base_url=args.answer_base_url or (args.base_url if same else None),
                              api_key=args.api_key if same else None, **common)
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
    agent_failures: list[dict] = field(default_factory=list)
    sample_errors: dict[str, str] = field(default_factory=dict)
    notes: int = 0
    wall_s: float = 0.0


def _sessions_to_build(sample: Sample, limit: int | None) -> list:
    return sample.sessions[:limit] if limit else list(sample.sessions)


def _check_builder(ms: MemorySystem, rc: RunConfig, sample_id: str) -> None:
    done = ms.meta.get("sessions_done") or []
    prev = ms.meta.get("builder")
    now = {"provider": rc.builder.provider, "model": rc.builder.model}
    if done and prev and prev != now:
        raise UsageError(f"memory for {sample_id} in {rc.db_path} was built by {prev['provider']}/{prev['model']}, "
                         f"not {now['provider']}/{now['model']}: use another --db-path")


async def build_sample(sample: Sample, rc: RunConfig, builder: LLMClient, embedder: LLMClient, stats: BuildStats,
                       progress: Progress) -> MemorySystem:
    sdir = rc.db_path / _safe(sample.id)
    if MemorySystem.exists(sdir):
        ms = MemorySystem.load(sdir, builder, embedder=embedder)
        _check_builder(ms, rc, sample.id)
        await ms.ensure_index()
    else:
        ms = MemorySystem(builder, embedder=embedder)
    ms.meta.update(sample_id=sample.id, dataset=sample.dataset,
                   builder={"provider": rc.builder.provider, "model": rc.builder.model},
                   baseline=rc.builder.provider == "offline")
    sessions = _sessions_to_build(sample, rc.args.sessions)
    done = set(ms.meta.get("sessions_done") or [])
    for session in sessions:
        if session.id in done:
            stats.sessions_skipped += 1
            progress.update("session")
            continue
        try:
            result = await ms.build_session(session)
        except LLMCallError as exc:  # embedding or compression transport failure: the state stays pre-session
            stats.sample_errors[sample.id] = f"session {session.id}: {exc.reason}"
            ms.meta["build_error"] = stats.sample_errors[sample.id]
            await asyncio.to_thread(ms.save, sdir)
            log.error("sample %s stopped at session %s: %s", sample.id, session.id, exc.reason)
            return ms
        stats.sessions_built += 1
        stats.agent_calls += len(result.calls)
        stats.notes += len(result.notes)
        for agent, reason in result.failures.items():
            stats.agent_failures.append({"sample_id": sample.id, "session_id": session.id, "agent": agent,
                                         "reason": reason})
        ms.meta.pop("build_error", None)
        ms.meta["complete"] = len(ms.meta["sessions_done"]) >= len(sample.sessions)
        await asyncio.to_thread(ms.save, sdir)  # the next session waits for it; other samples go on
        progress.update("session")
    return ms


# --------------------------------------------------------------------------- answer and judge

def _answer_record(sample: Sample, q: Question) -> dict:
    return {"sample_id": sample.id, "question_id": q.id, "question": q.text, "gold": q.answer, "type": q.type,
            "category": q.category, "category_name": q.category_name}


async def answer_question(sample: Sample, q: Question, ms: MemorySystem | None, rc: RunConfig, answerer: LLMClient,
                          judge: LLMClient, answers: Journal, judgments: Journal, sem: asyncio.Semaphore,
                          build_error: str | None) -> None:
    async with sem:
        rec = _answer_record(sample, q)
        prev = answers.records.get(q.id)
        if prev and not prev.get("error"):
            rec = prev
        elif ms is None or build_error:
            rec.update(answer=None, error=f"memory not built: {build_error or 'missing'}", retrieved_ids=[],
                       retrieved_types=[])
            await answers.put(rec)
        else:
            t0 = time.perf_counter()
            try:
                res = await ms.answer(q.text, answerer, current_time=sample.current_time, k=rc.args.top_k)
                rec.update(answer=res.answer, retrieved_ids=[r.entry.id for r in res.retrieved],
                           retrieved_types=[r.entry.type for r in res.retrieved], answer_model=res.model,
                           latency_s=round(time.perf_counter() - t0, 3), error=None)
            except LLMCallError as exc:
                rec.update(answer=None, retrieved_ids=[], retrieved_types=[], answer_model=answerer.model,
                           error=f"answer: {exc.reason}")
            await answers.put(rec)
        if rec.get("error"):
            return
        prev_j = judgments.records.get(q.id)
        if prev_j and prev_j.get("label") and prev_j.get("answer") == rec["answer"]:
            return
        v = await judge_answer(judge, rc.args.judge_protocol, question=q.text, gold=q.answer, answer=rec["answer"],
                               question_type=q.type, abstention=bool(q.extra.get("abstention")))
        await judgments.put({"sample_id": sample.id, "question_id": q.id, "label": v.label, "judge_model": v.model,
                             "protocol": v.protocol, "answer": rec["answer"],
                             "error": f"judge: {v.error}" if v.error else None})


# --------------------------------------------------------------------------- orchestration

def _merge_records(samples: Sequence[Sample], answers: Journal, judgments: Journal, limit: int | None) -> list[dict]:
    out = []
    for s in samples:
        for q in (s.questions[:limit] if limit else s.questions):
            a = answers.records.get(q.id) or {}
            j = judgments.records.get(q.id) or {}
            error = a.get("error") or j.get("error") or (None if j.get("label") else "not judged")
            out.append({**_answer_record(s, q), "prediction": a.get("answer"), "label": j.get("label"),
                        "failed": bool(error), "failure_reason": error})
    return out


async def run(rc: RunConfig, samples: list[Sample]) -> dict:
    args = rc.args
    progress = Progress(not args.no_progress)
    builder = LLMClient(rc.builder)
    # Retrieval must embed questions with the model that embedded the memory: one embedder for both stages.
    embedder = builder
    answerer = LLMClient(rc.answerer)
    judge = LLMClient(rc.judge)
    rc.output_dir.mkdir(parents=True, exist_ok=True)
    answers = judgments = None
    stats = BuildStats()
    timing: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
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

        async def one_sample(sample: Sample) -> None:
            ms: MemorySystem | None = None
            if args.mode in ("build", "full"):
                async with wsem:
                    t0 = time.perf_counter()
                    ms = await build_sample(sample, rc, builder, embedder, stats, progress)
                    build_spans.append((t0, time.perf_counter()))
            if args.mode == "build":
                return
            if ms is None:
                ms = MemorySystem.load(rc.db_path / _safe(sample.id), None, embedder=embedder)
                await ms.ensure_index()
            build_error = stats.sample_errors.get(sample.id) or ms.meta.get("build_error")
            qs = sample.questions[: args.questions] if args.questions else sample.questions

            async def q_task(q: Question) -> None:
                await answer_question(sample, q, ms, rc, answerer, judge, answers, judgments, qsem, build_error)
                progress.update("question")

            t0 = time.perf_counter()
            await asyncio.gather(*(q_task(q) for q in qs))
            await answers.sync()
            await judgments.sync()
            qa_spans.append((t0, time.perf_counter()))

        if args.mode == "answer":
            missing = [s.id for s in samples if not MemorySystem.exists(rc.db_path / _safe(s.id))]
            if missing:
                raise UsageError(f"no memory for {len(missing)} sample(s) under {rc.db_path} "
                                 f"(e.g. {missing[0]}): run --mode build first or pass the right --db-path")
        await asyncio.gather(*(one_sample(s) for s in samples))
        timing["total_s"] = round(time.perf_counter() - t_start, 3)
        # Samples overlap (a sample is answered while others still build), so each stage reports its wall span
        # from its first start to its last end, and the sum of per-sample times beside it.
        for stage, spans in (("build", build_spans), ("answer_judge", qa_spans)):
            if spans:
                timing[f"{stage}_wall_s"] = round(max(e for _, e in spans) - min(b for b, _ in spans), 3)
                timing[f"{stage}_s_sum_over_samples"] = round(sum(e - b for b, e in spans), 3)
    finally:
        progress.close()
        for j in (answers, judgments):
            if j is not None:
                j.close()
        for c in {id(x): x for x in (builder, answerer, judge)}.values():
            await c.aclose()

    stats.wall_s = timing.get("total_s", 0.0)
    baseline = "offline" in {rc.builder.provider, rc.answerer.provider, rc.judge.provider}
    build_summary = {
        "sessions_total": sum(len(_sessions_to_build(s, args.sessions)) for s in samples),
        "sessions_built": stats.sessions_built, "sessions_resumed": stats.sessions_skipped,
        "agent_calls": stats.agent_calls, "agent_calls_failed": len(stats.agent_failures),
        "agent_failures": stats.agent_failures, "samples_stopped": stats.sample_errors,
        "db_path": str(rc.db_path),
    } if args.mode in ("build", "full") else None
    models = {"builder": f"{rc.builder.provider}/{rc.builder.model}",
              "answer": f"{rc.answerer.provider}/{rc.answerer.model}",
              "judge": f"{rc.judge.provider}/{rc.judge.model}",
              "embedding": f"{rc.builder.embedding_provider}/{rc.builder.embedding_model}"}
    # Question embeddings go through the builder's embedder, so they are counted under "build" as embed.query.
    usage = {"build": builder.usage.snapshot(), "answer": answerer.usage.snapshot(), "judge": judge.usage.snapshot()}
    summary: dict[str, Any] = {}
    if args.mode in ("answer", "full"):
        records = _merge_records(samples, answers, judgments, args.questions)
        summary = metrics.summarize(records, dataset=args.dataset)
    summary.update({
        "dataset": args.dataset, "mode": args.mode, "n_samples": len(samples), "models": models,
        "judge": JUDGE_PROTOCOLS[args.judge_protocol], "judge_protocol": args.judge_protocol,
        "baseline": metrics.BASELINE_NOTE if baseline else False,
        "build": build_summary, "usage": usage, "timing": timing,
        "settings": {"top_k": args.top_k, "construction_top_k": config.MEMORY_CONSTRUCTION_TOP_K,
                     "concurrency": args.concurrency, "parallel": args.parallel,
                     "workers": args.workers if args.parallel else 1, "sessions": args.sessions,
                     "questions": args.questions, "vector_store": args.vector_store},
    })
    if args.mode == "build":
        atomic_write_text(rc.output_dir / BUILD_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        atomic_write_text(rc.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
        metrics.write_report(rc.output_dir, summary, title=f"MemBuilder evaluation: {args.dataset}")
    return summary


def print_summary(summary: dict, rc: RunConfig) -> None:
    lines = [""]
    if summary.get("baseline"):
        lines.append("OFFLINE BASELINE (rule-based builder, extractive answerer, lexical judge): not an LLM result")
    lines.append(f"dataset {summary['dataset']}  mode {summary['mode']}  samples {summary['n_samples']}")
    b = summary.get("build")
    if b:
        lines.append(f"build: {b['sessions_built']} sessions built, {b['sessions_resumed']} resumed, "
                     f"{b['agent_calls_failed']} of {b['agent_calls']} agent calls failed, "
                     f"{len(b['samples_stopped'])} samples stopped  -> {b['db_path']}")
    if "accuracy" in summary:
        lines.append(f"accuracy {summary['accuracy']}% ({summary['n_correct']}/{summary['n_questions']}, "
                     f"{summary['n_failed']} failed)  judge {summary['models']['judge']} [{summary['judge_protocol']}]")
        if summary.get("without_adversarial"):
            lines.append(f"  without adversarial: {summary['without_adversarial'].get('accuracy')}%")
    lines.append(f"wall time {summary['timing'].get('total_s')} s  -> {rc.output_dir}")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        rc = resolve(args)
        samples = load_dataset(args.dataset, data_dir=args.data_dir, split=args.split,
                               sample_ids=args.sample_id or args.conv_id, subset_file=args.subset_file,
                               dataset_path=args.dataset_path, character_ids=args.character_id)
        if not samples:
            raise UsageError("no samples selected")
        summary = asyncio.run(run(rc, samples))
    except (UsageError, DatasetError, MemoryStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished sessions and answers are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print_summary(summary, rc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
