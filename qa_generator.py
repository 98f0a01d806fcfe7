"""Synthetic session QA, the dense reward data of ADRPO (PAPER §4).

For one session, a strong model (`config.QA_GENERATION_MODEL`) reads the memory as it was BEFORE the session (the
whole core block and every entry) plus the session with its timestamp, and writes `--qa-per-session` (5) first-person
factual questions: about half single-session, ~30 % multi-session, ~20 % temporal-reasoning. The reward server later
answers them from the memory the policy builds, so only complete items are kept: a question, an answer, a known type
and a known source.

As a module: `await generate_session_qa(client, core=..., entries=..., session_text=..., session_time=...)`, or
`await fill_qa_cache(client, dialogue, n)` for every session of an expert-trajectory dialogue (cached in
`<dialogue>/qa_cache.jsonl`, resumable). As a CLI it fills those caches:

    python qa_generator.py --trajectory-dir expert_trajectories/longmemeval --qa-per-session 5 --model claude-4.5-opus

The `offline` provider answers `qa.generate` with deterministic template questions drawn from the session's own
sentences (registered below), so the whole pipeline runs without a model; such questions are a smoke path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import config
import prompts
from llm_client import AVAILABLE_PROVIDERS, ClientSettings, LLMCallError, LLMClient, extract_json, register_offline_handler
from prompts import QA_SOURCES, QA_TYPES

log = logging.getLogger("qa_generator")


class QAValidationError(ValueError):
    """A QA generation output that does not hold enough complete questions."""


# --------------------------------------------------------------------------- records and validation

@dataclass
class QAPair:
    question: str
    answer: str
    type: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QAPair":
        return cls(str(d["question"]), str(d["answer"]), str(d["type"]), str(d["source"]))


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_TYPE_ALIASES = {_key(a): t for t in QA_TYPES for a in (t, t.replace("-", "_"), t.replace("-", " "), t.split("-")[0])}
_TYPE_ALIASES.update({"temporal": "temporal-reasoning", "temporal reasoning": "temporal-reasoning"})
_SOURCE_ALIASES = {_key(a): s for s in QA_SOURCES for a in (s, s.replace("_", "-"), s.split("_")[0])}


def normalize_type(value: Any) -> str | None:
    return _TYPE_ALIASES.get(_key(value)) if isinstance(value, str) else None


def normalize_source(value: Any) -> str | None:
    return _SOURCE_ALIASES.get(_key(value)) if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


def complete_item(item: Any) -> tuple[QAPair | None, str | None]:
    """(pair, None) for a complete item, else (None, why it was dropped)."""
    if not isinstance(item, dict):
        return None, "not an object"
    question, answer = _text(item.get("question")), _text(item.get("answer"))
    if question is None:
        return None, "no question"
    if answer is None:
        return None, "no answer"
    qtype = normalize_type(item.get("type"))
    if qtype is None:
        return None, f"unknown type {item.get('type')!r}"
    source = normalize_source(item.get("source"))
    if source is None:
        return None, f"unknown source {item.get('source')!r}"
    return QAPair(question, answer, qtype, source), None


@dataclass
class QAParse:
    pairs: list[QAPair]
    rejected: list[str] = field(default_factory=list)


def parse_qa(raw: str | dict, n: int) -> QAParse:
    """The complete, distinct items of an output (at most n, in order), and why the others were dropped.

    Raises QAValidationError when the output has no `questions` list at all."""
    if isinstance(raw, str):
        try:
            obj = extract_json(raw)
        except ValueError as exc:
            raise QAValidationError(str(exc)) from None
    else:
        obj = raw
    items = obj.get("questions") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise QAValidationError("output has no 'questions' list")
    pairs: list[QAPair] = []
    rejected: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        pair, why = complete_item(item)
        if pair is None:
            rejected.append(f"questions[{i}]: {why}")
        elif _key(pair.question) in seen:
            rejected.append(f"questions[{i}]: duplicate question")
        elif len(pairs) >= n:
            rejected.append(f"questions[{i}]: beyond the {n} asked for")
        else:
            seen.add(_key(pair.question))
            pairs.append(pair)
    return QAParse(pairs, rejected)


def validate_qa(raw: str | dict, n: int, min_complete: int | None = None) -> list[QAPair]:
    """The pairs of an output that holds at least `min_complete` (default n) complete items; else QAValidationError
    (which makes `LLMClient.chat_json` ask again)."""
    parsed = parse_qa(raw, n)
    need = n if min_complete is None else min_complete
    if len(parsed.pairs) < need:
        why = "; ".join(parsed.rejected[:3])
        raise QAValidationError(f"{len(parsed.pairs)} complete question(s), {need} needed" + (f" ({why})" if why else ""))
    return parsed.pairs


def mix_warnings(pairs: list[QAPair], n: int, has_history: bool = True) -> list[str]:
    """Where the type mix departs from the asked-for ranges (reported, not rejected: the session may not allow it)."""
    counts = {t: sum(p.type == t for p in pairs) for t in QA_TYPES}
    out = []
    for t, (lo, hi) in prompts.qa_type_mix(n).items():
        if t == "multi-session" and not has_history:
            continue
        if not lo <= counts[t] <= hi:
            out.append(f"{counts[t]} {t} question(s), {lo}-{hi} asked for")
    return out


@dataclass
class QAResult:
    pairs: list[QAPair]
    raw_output: str | None
    model: str
    error: str | None = None
    rejected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.pairs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [p.to_dict() for p in self.pairs]
        return d


async def generate_session_qa(client: LLMClient, *, core: str, entries: list[tuple[str, str]], session_text: str,
                              session_time: str | None, n: int = config.QA_PER_SESSION) -> QAResult:
    """n questions for one session. An output with fewer complete items is asked again (with the client's retries);
    when retries are spent, whatever complete items the last output held are kept and the shortfall is noted."""
    prompt = prompts.qa_generation_prompt(core, entries, session_text, session_time, n)
    has_history = bool(core.strip() or entries)
    t0 = time.perf_counter()
    try:
        pairs, res = await client.chat_json(prompt, lambda text: validate_qa(text, n))
    except LLMCallError as exc:
        salvaged = QAParse([])
        if exc.last_output:
            try:
                salvaged = parse_qa(exc.last_output, n)
            except QAValidationError:
                pass
        result = QAResult(salvaged.pairs, exc.last_output, client.model, rejected=salvaged.rejected,
                          latency_s=time.perf_counter() - t0, attempts=exc.attempts)
        if salvaged.pairs:
            result.warnings.append(f"kept {len(salvaged.pairs)} of {n} questions after retries ({exc.reason})")
            result.warnings += mix_warnings(salvaged.pairs, n, has_history)
        else:
            result.error = exc.reason
        return result
    parsed = parse_qa(res.text, n)
    return QAResult(pairs, res.text, res.model, rejected=parsed.rejected, warnings=mix_warnings(pairs, n, has_history),
                    latency_s=res.latency_s, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                    attempts=res.attempts)


# --------------------------------------------------------------------------- trajectory sessions and the cache

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
    """The core block and every (type, text) entry of the memory before session i."""
    from memory_system import MemoryState

    data = json.loads((dialogue.state_path(i) / "memory.json").read_text(encoding="utf-8"))
    state = MemoryState.from_dict(data)
    return state.core, [(e.type, e.text) for e in state.entries]


def cache_key(session_index: int, n: int, model: str) -> str:
    return f"{session_index}|{n}|{model}"


def read_qa_cache(dialogue_dir: str | Path) -> dict[str, dict]:
    """Usable cached QA records by key (a torn last line from a killed run is ignored; later records win)."""
    from training import trajectories as tj

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
    from training import trajectories as tj

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
        tj.append_jsonl(dialogue.path / tj.QA_CACHE_FILE, [rec])
        out[i] = rec
        if on_done:
            on_done(i, rec)

    await asyncio.gather(*(one(i) for i in wanted))
    return out


# --------------------------------------------------------------------------- offline handler

@register_offline_handler(prompts.TASK_QA_GENERATE)
def offline_qa(inputs: dict) -> str:
    """Deterministic template questions from the session's own sentences (a smoke path, never an LLM result)."""
    from offline_backend import _clip, _sentences, _speaking_messages, content_tokens, normalize_date

    n = int(inputs.get("n_questions") or config.QA_PER_SESSION)
    mix = prompts.qa_type_mix(n)
    raw_time = inputs.get("session_time")
    date = (normalize_date(raw_time) or raw_time or "the day of our conversation").split(" ")[0]
    msgs = _speaking_messages(inputs.get("session_text", ""))
    cands = [s for _, text in msgs for s in _sentences(text) if len(content_tokens(s)) >= 3 and len(s) <= 400]
    if not cands:
        cands = [s for _, text in msgs for s in _sentences(text) if content_tokens(s)]
    entries = [tuple(e) for e in inputs.get("entries") or []]

    def keywords(sentence: str, k: int = 4) -> str:
        words, seen = [], set()
        for w in re.findall(r"[A-Za-z][A-Za-z0-9'-]*", sentence):  # list numbers ("2.") are no keywords
            t = content_tokens(w)
            if t and t[0] not in seen:
                seen.add(t[0])
                words.append(w)
            if len(words) == k:
                break
        return " ".join(words) or _clip(sentence, 40)

    n_temporal = mix["temporal-reasoning"][0]
    n_multi = mix["multi-session"][0] if entries else 0
    kinds = ["single-session"] * max(0, n - n_temporal - n_multi) + ["multi-session"] * n_multi
    kinds += ["temporal-reasoning"] * n_temporal
    questions = []
    for j, kind in enumerate(kinds):
        if not cands:
            break
        sent = cands[(j * len(cands)) // len(kinds)]
        kw = keywords(sent)
        if kind == "temporal-reasoning":
            questions.append({"question": f"On what date did I talk about {kw}?", "answer": date,
                              "type": kind, "source": "current_session"})
        elif kind == "multi-session":
            sent_toks = set(content_tokens(sent))
            etype, etext = max(reversed(entries), key=lambda e: len(sent_toks & set(content_tokens(e[1]))))
            head = _clip(etext.split("| Details:", 1)[0], 160)
            questions.append({"question": f"What had I told you before about {keywords(head)}, and what did I say "
                                          f"on {date} about {kw}?",
                              "answer": f"{head}; {_clip(sent, 200)}", "type": kind, "source": "cross_session"})
        else:
            form = ("In our conversation on {d}, what did I say about {k}?", "What did I mention on {d} about {k}?",
                    "What did I tell you about {k} on {d}?")[j % 3]
            questions.append({"question": form.format(d=date, k=kw), "answer": _clip(sent, 200), "type": kind,
                              "source": "current_session"})
    return json.dumps({"questions": questions}, ensure_ascii=False)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from training.trajectories import OneLineParser

    p = OneLineParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--output", help="also write every session's QA record to this JSONL file")
    p.add_argument("--verbose", action="store_true")
    return p


def qa_client(provider: str, model: str, base_url: str | None, api_key: str | None, max_in_flight: int) -> LLMClient:
    # QA generation needs no embeddings: the embedding settings stay at their defaults and are never used.
    return LLMClient(ClientSettings(provider=provider, model=model, base_url=base_url, api_key=api_key,
                                    embedding_provider="offline", max_in_flight=max(1, max_in_flight)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training import trajectories as tj

    try:
        if args.qa_per_session < 1:
            raise tj.TrajectoryError("--qa-per-session must be at least 1")
        if args.workers < 1:
            raise tj.TrajectoryError("--workers must be at least 1")
        dialogues = [tj.load_dialogue(p) for p in tj.find_dialogues(args.trajectory_dir)]
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
        client = qa_client(args.provider, args.model, args.base_url, args.api_key, args.workers)
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
