"""Benchmark loaders: every dataset becomes a list of `Sample` records (docs/interfaces.md).

A `Sample` is one history of dated sessions plus the questions asked after it:
one LoCoMo conversation, one LongMemEval instance, one PerLTQA protagonist, or the built-in demo.
The project's own *dialogue format* is a JSON list of `Sample.to_dict()` (`save_dialogues`,
`load_dataset("dialogues", dataset_path=...)`).

Decisions where the benchmarks leave room (the README repeats them):

* File lookup under `data_dir` (`dataset_path` always wins):
  LoCoMo `locomo/locomo10.json`, else the only `*.json` in `locomo/` (several -> error);
  LongMemEval the first of `longmemeval/longmemeval_s_cleaned.json`, `longmemeval_s.json`,
  `longmemeval_s_sample.json`; its splits `longmemeval/splits/longmemeval_splits.json`, then
  `longmemeval/longmemeval_splits.json`, then the copy committed in this repository;
  PerLTQA `perltqa/perltmem_en_v2.json` + `perltqa/perltqa_en_v2.json`, else the v1 names
  `perltmem_en.json` + `perltqa_en.json`. A PerLTQA `dataset_path` is a folder holding both files,
  or the memory file with the QA file beside it (`perltmem` -> `perltqa` in the name).
* LoCoMo roles: both speakers are people. `speaker_a` is the "user" whose memory is built and
  `speaker_b` is "other" (a second person, not an AI assistant, so the agents keep their facts too).
  Content is "Name: text"; a shared image adds " [shares an image: <blip_caption>]".
  Date keys without a turn list (conv-26 sessions 20-35) are ignored.
* LoCoMo category 5 (adversarial): the gold is always "Not answerable". The misleading
  `adversarial_answer` and, in the rare items that have one, the dataset's own `answer`
  (`original_answer`) are kept in `extra`.
* LongMemEval sessions keep the file's order when `haystack_dates` are already chronological
  (LongMemEval_S/M are); otherwise (the oracle file) they are stably sorted by date and
  `meta["reordered"]` is set. Dates that do not parse leave the order as it is.
* PerLTQA: one session per dialogue timestamp (turns alternate user/assistant, each line already
  reads "Speaker: text") and one pseudo-session per event (a single "user" message narrating it),
  all sorted by time; event times that do not parse ("during an election") come first, in file
  order, since they cannot be placed. Only protagonists present in both files become samples.
* Sessions without any message are dropped.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

ROLES = ("user", "assistant", "system", "other")
DATASETS = ("locomo", "longmemeval", "perltqa", "demo", "dialogues")
NOT_ANSWERABLE = "Not answerable"

LOCOMO_CATEGORY_NAMES: dict[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
LOCOMO_ADVERSARIAL = 5
PERLTQA_SECTIONS = ("profile", "social_relationship", "events", "dialogues")

# The splits file committed with the project, used when data_dir has none.
_REPO_SPLITS = Path(__file__).resolve().parents[1] / "data" / "longmemeval" / "splits" / "longmemeval_splits.json"


class DatasetError(Exception):
    """A user error in dataset selection or content; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------- records


def _require(d: Any, key: str, what: str) -> Any:
    if not isinstance(d, dict):
        raise DatasetError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise DatasetError(f"{what}: missing key '{key}' (has: {_some(d)})")
    return d[key]


@dataclass
class Message:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, d: dict, what: str = "message") -> "Message":
        role = _require(d, "role", what)
        if role not in ROLES:
            raise DatasetError(f"{what}: unknown role {role!r} (valid: {', '.join(ROLES)})")
        return cls(role=role, content=str(_require(d, "content", what)))


@dataclass
class Session:
    id: str
    time: str | None
    messages: list[Message]

    def to_dict(self) -> dict:
        return {"id": self.id, "time": self.time, "messages": [m.to_dict() for m in self.messages]}

    @classmethod
    def from_dict(cls, d: dict, what: str = "session") -> "Session":
        sid = str(_require(d, "id", what))
        messages = _require(d, "messages", what)
        if not isinstance(messages, list):
            raise DatasetError(f"{what} '{sid}': 'messages' must be a list")
        return cls(
            id=sid,
            time=d.get("time"),
            messages=[Message.from_dict(m, f"{what} '{sid}' message {i}") for i, m in enumerate(messages)],
        )


@dataclass
class Question:
    id: str
    text: str
    answer: str
    type: str
    category: int | None = None
    category_name: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, what: str = "question") -> "Question":
        return cls(
            id=str(_require(d, "id", what)),
            text=str(_require(d, "text", what)),
            answer=str(_require(d, "answer", what)),
            type=str(_require(d, "type", what)),
            category=d.get("category"),
            category_name=d.get("category_name"),
            extra=dict(d.get("extra") or {}),
        )


@dataclass
class Sample:
    id: str
    dataset: str
    sessions: list[Session]
    questions: list[Question]
    current_time: str | None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "sessions": [s.to_dict() for s in self.sessions],
            "questions": [q.to_dict() for q in self.questions],
            "current_time": self.current_time,
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict, what: str = "sample") -> "Sample":
        sid = str(_require(d, "id", what))
        where = f"{what} '{sid}'"
        sessions = _require(d, "sessions", where)
        questions = _require(d, "questions", where)
        if not isinstance(sessions, list) or not isinstance(questions, list):
            raise DatasetError(f"{where}: 'sessions' and 'questions' must be lists")
        return cls(
            id=sid,
            dataset=str(_require(d, "dataset", where)),
            sessions=[Session.from_dict(s, f"{where} session {i}") for i, s in enumerate(sessions)],
            questions=[Question.from_dict(q, f"{where} question {i}") for i, q in enumerate(questions)],
            current_time=d.get("current_time"),
            meta=dict(d.get("meta") or {}),
        )


# --------------------------------------------------------------------------------------------- helpers


def render_session(session: Session) -> str:
    """The session as the agents see it: the memory system's rendering is the only one."""
    from memory_system import render_session as _render

    return _render(session.messages)


def locomo_category_name(cat: int) -> str:
    try:
        return LOCOMO_CATEGORY_NAMES[int(cat)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown LoCoMo category {cat!r} (valid: 1-5)") from None


def _some(items: Iterable[Any], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > n else shown or "none"


def _answer_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def read_json(path: str | os.PathLike, what: str = "dataset file") -> Any:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"{what} is a folder, expected a JSON file: {path}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{what} {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path}: {e.strerror or e}") from None


def save_dialogues(samples: Sequence[Sample], path: str | os.PathLike) -> Path:
    """Write samples in the dialogue format, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump([s.to_dict() for s in samples], f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_id_file(path: str | os.PathLike) -> list[str]:
    """Ids from a JSON list (or {"ids": [...]}) or a text file with one id per line (# comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read subset file {path}: {e.strerror or e}") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"subset file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("ids", "sample_ids", "question_ids") if k in data), None)
        if not isinstance(data, list) or not all(isinstance(x, (str, int)) for x in data):
            raise DatasetError(f"subset file {path}: expected a JSON list of ids or {{\"ids\": [...]}}")
        ids = [str(x) for x in data]
    else:
        ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        ids = [i for i in ids if i]
    if not ids:
        raise DatasetError(f"subset file {path} lists no ids")
    return ids


def _parse_time(text: str | None, formats: Sequence[str]) -> datetime | None:
    if not text:
        return None
    text = " ".join(str(text).split())
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------------------------- LoCoMo

_LOCOMO_SESSION = re.compile(r"session_(\d+)")


def _locomo_sample(rec: dict, where: str) -> Sample:
    sample_id = str(_require(rec, "sample_id", where))
    where = f"{where} ({sample_id})"
    conv = _require(rec, "conversation", where)
    speaker_a = _require(conv, "speaker_a", f"{where} conversation")
    speaker_b = _require(conv, "speaker_b", f"{where} conversation")
    numbers = sorted(
        int(m.group(1)) for k, v in conv.items() if (m := _LOCOMO_SESSION.fullmatch(k)) and isinstance(v, list)
    )
    sessions = []
    for n in numbers:
        turns = conv[f"session_{n}"]
        messages = []
        for i, turn in enumerate(turns):
            what = f"{where} session_{n} turn {i}"
            speaker = _require(turn, "speaker", what)
            text = str(turn.get("text") or "")
            if turn.get("blip_caption"):
                text = f"{text} [shares an image: {turn['blip_caption']}]".strip()
            role = "user" if speaker == speaker_a else "other"
            messages.append(Message(role, f"{speaker}: {text}"))
        if messages:
            sessions.append(Session(f"session_{n}", conv.get(f"session_{n}_date_time"), messages))
    if not sessions:
        raise DatasetError(f"{where}: no 'session_<n>' key holds a list of turns")

    questions = []
    for k, qa in enumerate(_require(rec, "qa", where)):
        what = f"{where} qa[{k}]"
        raw_cat = _require(qa, "category", what)
        try:
            category = int(raw_cat)
            name = locomo_category_name(category)
        except ValueError as e:
            raise DatasetError(f"{what}: {e}") from None
        extra: dict[str, Any] = {"evidence": [e for ev in qa.get("evidence") or [] for e in re.split(r"[;\s]+", str(ev)) if e]}
        if category == LOCOMO_ADVERSARIAL:
            answer = NOT_ANSWERABLE
            if "adversarial_answer" in qa:
                extra["adversarial_answer"] = _answer_str(qa["adversarial_answer"])
            if "answer" in qa:
                extra["original_answer"] = _answer_str(qa["answer"])
        else:
            answer = _answer_str(_require(qa, "answer", what))
        questions.append(
            Question(f"{sample_id}_q{k}", str(_require(qa, "question", what)), answer, name, category, name, extra)
        )
    return Sample(
        id=sample_id,
        dataset="locomo",
        sessions=sessions,
        questions=questions,
        current_time=sessions[-1].time,
        meta={"speaker_a": speaker_a, "speaker_b": speaker_b},
    )


def _locomo_file(data_dir: Path) -> Path:
    folder = data_dir / "locomo"
    canonical = folder / "locomo10.json"
    if canonical.is_file():
        return canonical
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(
            f"no {canonical} and several JSON files in {folder} ({_some(p.name for p in found)}): choose one with --dataset-path"
        )
    raise DatasetError(
        f"LoCoMo file not found: {canonical}; run `python scripts/download_data.py --datasets locomo` or pass --dataset-path"
    )


def _locomo_records(path: Path) -> list[tuple[str, Callable[[], Sample]]]:
    data = read_json(path, "LoCoMo file")
    if not isinstance(data, list):
        raise DatasetError(f"LoCoMo file {path}: expected a JSON list of conversations, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        where = f"LoCoMo file {path} record {i}"
        out.append((str(_require(rec, "sample_id", where)), lambda rec=rec, where=where: _locomo_sample(rec, where)))
    return out


# --------------------------------------------------------------------------------------------- LongMemEval

LONGMEMEVAL_FILES = ("longmemeval_s_cleaned.json", "longmemeval_s.json", "longmemeval_s_sample.json")
_LME_DATE_FORMATS = ("%Y/%m/%d (%a) %H:%M", "%Y/%m/%d %H:%M", "%Y/%m/%d")


def _longmemeval_sample(rec: dict, where: str, split_of: dict[str, str]) -> Sample:
    qid = str(_require(rec, "question_id", where))
    where = f"{where} ({qid})"
    ids = _require(rec, "haystack_session_ids", where)
    dates = _require(rec, "haystack_dates", where)
    hay = _require(rec, "haystack_sessions", where)
    if not (isinstance(ids, list) and isinstance(dates, list) and isinstance(hay, list)) or not len(ids) == len(dates) == len(hay):
        raise DatasetError(
            f"{where}: haystack_session_ids, haystack_dates and haystack_sessions must be lists of equal length"
        )
    sessions, evidence, seen = [], [], set()
    for i, (sid, date, turns) in enumerate(zip(ids, dates, hay)):
        sid = str(sid)
        while sid in seen:  # ids are unique in the released files; keep them unique if a copy is not
            sid += "+"
        seen.add(sid)
        messages = []
        for j, turn in enumerate(turns or []):
            what = f"{where} session {i} turn {j}"
            role = _require(turn, "role", what)
            if role not in ROLES:
                raise DatasetError(f"{what}: unknown role {role!r} (valid: {', '.join(ROLES)})")
            messages.append(Message(role, str(_require(turn, "content", what))))
            if turn.get("has_answer"):
                evidence.append(f"{sid}#{j}")
        if messages:
            sessions.append(Session(sid, date, messages))
    meta: dict[str, Any] = {}
    parsed = [_parse_time(s.time, _LME_DATE_FORMATS) for s in sessions]
    if all(p is not None for p in parsed) and parsed != sorted(parsed):
        order = sorted(range(len(sessions)), key=lambda k: parsed[k])
        sessions = [sessions[k] for k in order]
        meta["reordered"] = True
    if qid in split_of:
        meta["split"] = split_of[qid]
    question = Question(
        id=qid,
        text=str(_require(rec, "question", where)),
        answer=_answer_str(_require(rec, "answer", where)),
        type=str(_require(rec, "question_type", where)),
        extra={
            "abstention": qid.endswith("_abs"),
            "answer_session_ids": [str(x) for x in rec.get("answer_session_ids") or []],
            "evidence": evidence,
        },
    )
    return Sample(qid, "longmemeval", sessions, [question], rec.get("question_date"), meta)


def _longmemeval_file(data_dir: Path) -> Path:
    folder = data_dir / "longmemeval"
    for name in LONGMEMEVAL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(
        f"LongMemEval file not found: {folder / LONGMEMEVAL_FILES[0]} (also tried {', '.join(LONGMEMEVAL_FILES[1:])}); "
        "run `python scripts/download_data.py --datasets longmemeval` or pass --dataset-path"
    )


def splits_file(data_dir: str | os.PathLike = "data") -> Path | None:
    data_dir = Path(data_dir)
    for path in (
        data_dir / "longmemeval" / "splits" / "longmemeval_splits.json",
        data_dir / "longmemeval" / "longmemeval_splits.json",
        _REPO_SPLITS,
    ):
        if path.is_file():
            return path
    return None


def load_splits(data_dir: str | os.PathLike = "data") -> dict[str, list[str]]:
    """MemBuilder's LongMemEval question-id splits: {"sft": [...], "rl": [...], "test": [...]}."""
    path = splits_file(data_dir)
    if path is None:
        raise DatasetError(f"LongMemEval splits file not found: {Path(data_dir) / 'longmemeval/splits/longmemeval_splits.json'}")
    data = read_json(path, "LongMemEval splits file")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetError(f"LongMemEval splits file {path}: expected {{split name: [question ids]}}")
    return {k: [str(x) for x in v] for k, v in data.items()}


def _longmemeval_records(path: Path, data_dir: Path) -> list[tuple[str, Callable[[], Sample]]]:
    data = read_json(path, "LongMemEval file")
    if not isinstance(data, list):
        raise DatasetError(f"LongMemEval file {path}: expected a JSON list of instances, got {type(data).__name__}")
    split_of = {qid: name for name, ids in load_splits(data_dir).items() for qid in ids} if splits_file(data_dir) else {}
    out = []
    for i, rec in enumerate(data):
        where = f"LongMemEval file {path} record {i}"
        out.append(
            (str(_require(rec, "question_id", where)), lambda rec=rec, where=where: _longmemeval_sample(rec, where, split_of))
        )
    return out


# --------------------------------------------------------------------------------------------- PerLTQA

PERLTQA_FILES = (("perltmem_en_v2.json", "perltqa_en_v2.json"), ("perltmem_en.json", "perltqa_en.json"))
_PERLTQA_TIME_FORMATS = (
    "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d", "%Y/%m/%d %H:%M", "%Y/%m/%d",
    "%B %d, %Y", "%b %d, %Y", "%d %B %Y", "%B %d %Y", "%B %Y", "%b %Y", "%Y",
)


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(key)).lower()


def _get(d: dict, name: str, what: str, default: Any = ...) -> Any:
    """d[name], matching keys regardless of case, spaces and underscores (PerLTQA versions differ)."""
    if not isinstance(d, dict):
        raise DatasetError(f"{what}: expected a JSON object, got {type(d).__name__}")
    want = _norm_key(name)
    for key, value in d.items():
        if _norm_key(key) == want:
            return value
    if default is ...:
        raise DatasetError(f"{what}: missing key '{name}' (has: {_some(d)})")
    return default


def _perltqa_memory_records(data: Any, path: Path) -> dict[str, dict]:
    """name -> memory record, from v2 ({name: record}) or v1 ([record] or [{name: record}])."""
    out: dict[str, dict] = {}
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            what = f"PerLTQA memory file {path} record {i}"
            if isinstance(rec, dict) and _get(rec, "profile", what, None) is None and len(rec) == 1:
                items.extend(rec.items())
            else:
                profile = _get(rec, "profile", what)
                items.append((str(_get(profile, "Protagonist", f"{what} profile")), rec))
    else:
        raise DatasetError(f"PerLTQA memory file {path}: expected a JSON object or list, got {type(data).__name__}")
    for name, rec in items:
        if not isinstance(rec, dict):
            raise DatasetError(f"PerLTQA memory file {path} record '{name}': expected a JSON object")
        out[str(name)] = rec
    return out


def _perltqa_qa_records(data: Any, path: Path) -> dict[str, dict]:
    """name -> {section: [...]}, from a list of {name: sections} or one {name: sections} object."""
    items = data.items() if isinstance(data, dict) else None
    if items is None:
        if not isinstance(data, list):
            raise DatasetError(f"PerLTQA QA file {path}: expected a JSON list, got {type(data).__name__}")
        items = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DatasetError(f"PerLTQA QA file {path} record {i}: expected {{character name: sections}}")
            items.extend(rec.items())
    out: dict[str, dict] = {}
    for name, sections in items:
        if not isinstance(sections, dict):
            raise DatasetError(f"PerLTQA QA file {path} record '{name}': expected {{section: [questions]}}")
        if isinstance(_get(sections, "profile", "", None), dict):  # a memory record: its profile is an object
            raise DatasetError(f"PerLTQA QA file {path} looks like a memory file (record '{name}' has a profile object)")
        out.setdefault(str(name), {}).update(sections)
    return out


def _perltqa_questions(name: str, sections: dict, path: Path) -> list[Question]:
    questions: list[Question] = []
    for section in PERLTQA_SECTIONS:
        items = _get(sections, section, f"PerLTQA QA file {path} character '{name}'", None)
        if items is None:
            continue
        # A section is a list of records, or of {memory id: [records]} groups (v2), or a {memory id: [records]} object.
        groups: list[tuple[str | None, Any]] = []
        for item in items.items() if isinstance(items, dict) else items:
            if isinstance(item, tuple):
                groups.append(item)
            elif isinstance(item, dict) and _get(item, "Question", "", None) is None:
                groups.extend(item.items())
            else:
                groups.append((None, [item]))
        for memory_id, records in groups:
            for rec in records if isinstance(records, list) else [records]:
                what = f"PerLTQA QA file {path} character '{name}' section '{section}' question {len(questions)}"
                extra = {
                    "section": section,
                    "memory_id": memory_id,
                    "reference_memory": _get(rec, "Reference Memory", what, None),
                    "memory_anchors": _get(rec, "Memory Anchors", what, None),
                }
                questions.append(
                    Question(
                        id=f"{name}_q{len(questions)}",
                        text=str(_get(rec, "Question", what)),
                        answer=_answer_str(_get(rec, "Answer", what)),
                        type=section,
                        extra=extra,
                    )
                )
    return questions


def _perltqa_sessions(name: str, rec: dict, path: Path) -> list[Session]:
    where = f"PerLTQA memory file {path} record '{name}'"
    people = {}
    for rid, rel in (_get(rec, "social_relationship", where, None) or {}).items():
        if isinstance(rel, dict):
            person = _get(rel, "Supporting Characters", f"{where} social_relationship '{rid}'", None)
            relation = _get(rel, "Relationship", f"{where} social_relationship '{rid}'", None)
            if person:
                people[str(rid)] = f"{person}, {relation}" if relation else str(person)

    timed: list[tuple[datetime | None, int, Session]] = []
    events = _get(rec, "events", where)
    if not isinstance(events, dict):
        raise DatasetError(f"{where}: 'events' must be an object of event id -> event")
    for eid, event in events.items():
        what = f"{where} event '{eid}'"
        content = str(_get(event, "content", what)).strip()
        summary = str(_get(event, "summary", what, "") or "").strip()
        when = _get(event, "Creation Time", what, None) or None
        chars = _get(event, "Characters", what, None) or []
        with_whom = "; ".join(people.get(str(c), str(c)) for c in (chars if isinstance(chars, list) else [chars]))
        head = f"[Event record] {summary}" if summary else "[Event record]"
        if with_whom:
            head += f" (with {with_whom})"
        if content or summary:
            session = Session(f"event_{eid}", when, [Message("user", f"{head}: {content}" if content else head)])
            timed.append((_parse_time(when, _PERLTQA_TIME_FORMATS), len(timed), session))

    dialogues = _get(rec, "dialogues", where)
    if not isinstance(dialogues, dict):
        raise DatasetError(f"{where}: 'dialogues' must be an object of dialogue id -> dialogue")
    for did, dialogue in dialogues.items():
        what = f"{where} dialogue '{did}'"
        contents = _get(dialogue, "contents", what)
        if isinstance(contents, list):  # one conversation with its time beside it
            contents = {_get(dialogue, "time", what, None): contents}
        if not isinstance(contents, dict):
            raise DatasetError(f"{what}: 'contents' must map a timestamp to a list of lines")
        for n, (when, lines) in enumerate(contents.items()):
            if not isinstance(lines, list):
                raise DatasetError(f"{what} at {when}: expected a list of 'Speaker: text' lines")
            texts = [str(line).strip() for line in lines if str(line).strip()]
            messages = [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
            if messages:
                sid = str(did) if len(contents) == 1 else f"{did}@{n}"
                timed.append((_parse_time(when, _PERLTQA_TIME_FORMATS), len(timed), Session(sid, when, messages)))
    timed.sort(key=lambda t: (t[0] is not None, t[0] or datetime.min, t[1]))
    return [s for _, _, s in timed]


def _perltqa_files(data_dir: Path, dataset_path: Path | None, qa_path: Path | None) -> tuple[Path, Path]:
    if dataset_path is not None and qa_path is not None:
        return dataset_path, qa_path
    if dataset_path is not None and dataset_path.is_file():
        qa = dataset_path.with_name(dataset_path.name.replace("perltmem", "perltqa"))
        if qa == dataset_path or not qa.is_file():
            raise DatasetError(
                f"PerLTQA QA file not found beside {dataset_path} (expected {qa.name}); pass the folder holding both files or the QA file too"
            )
        return dataset_path, qa
    folder = dataset_path if dataset_path is not None else data_dir / "perltqa"
    for mem, qa in PERLTQA_FILES:
        if (folder / mem).is_file() and (folder / qa).is_file():
            return folder / mem, folder / qa
    if dataset_path is not None and not dataset_path.exists():
        raise DatasetError(f"PerLTQA dataset path not found: {dataset_path}")
    raise DatasetError(
        f"PerLTQA files not found: {folder / PERLTQA_FILES[0][0]} and {folder / PERLTQA_FILES[0][1]} (or the v1 names "
        f"{' and '.join(PERLTQA_FILES[1])}); run `python scripts/download_data.py --datasets perltqa` or pass --dataset-path"
    )


def _perltqa_records(memory_path: str | os.PathLike, qa_path: str | os.PathLike) -> list[tuple[str, Callable[[], Sample]]]:
    """(protagonist, build) pairs for the protagonists present in both PerLTQA files, in memory-file order."""
    memory_path, qa_path = Path(memory_path), Path(qa_path)
    memory = _perltqa_memory_records(read_json(memory_path, "PerLTQA memory file"), memory_path)
    qa = _perltqa_qa_records(read_json(qa_path, "PerLTQA QA file"), qa_path)
    if set(memory) and not set(memory) & set(qa):
        raise DatasetError(
            f"PerLTQA files share no protagonist: {memory_path} has {_some(memory)}; {qa_path} has {_some(qa)}"
        )
    for name in sorted(set(memory) ^ set(qa)):
        log.warning("PerLTQA: protagonist %r is in only one of the two files; skipped", name)

    def build(name: str) -> Sample:
        rec = memory[name]
        sessions = _perltqa_sessions(name, rec, memory_path)
        if not sessions:
            raise DatasetError(f"PerLTQA memory file {memory_path} record '{name}': no dialogue or event to build from")
        profile = _get(rec, "profile", f"PerLTQA memory file {memory_path} record '{name}'", {}) or {}
        return Sample(
            id=name,
            dataset="perltqa",
            sessions=sessions,
            questions=_perltqa_questions(name, qa[name], qa_path),
            current_time=sessions[-1].time,
            meta={"protagonist": name, "profile": profile},
        )

    return [(name, lambda name=name: build(name)) for name in memory if name in qa]


# --------------------------------------------------------------------------------------------- dialogues, demo


def load_dialogues(path: str | os.PathLike) -> list[Sample]:
    path = Path(path)
    data = read_json(path, "dialogue file")
    if not isinstance(data, list):
        raise DatasetError(f"dialogue file {path}: expected a JSON list of samples, got {type(data).__name__}")
    return [Sample.from_dict(d, f"dialogue file {path} sample {i}") for i, d in enumerate(data)]


def _eager(samples: list[Sample]) -> list[tuple[str, Callable[[], Sample]]]:
    return [(s.id, lambda s=s: s) for s in samples]


# --------------------------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike = "data",
    split: str | None = None,
    sample_ids: Sequence[str] | str | None = None,
    subset_file: str | os.PathLike | None = None,
    dataset_path: str | os.PathLike | None = None,
    character_ids: Sequence[str] | str | None = None,
    qa_path: str | os.PathLike | None = None,
) -> list[Sample]:
    """Load a benchmark as Samples, in file order, keeping those the filters select.

    `sample_ids` / `character_ids` (PerLTQA protagonist names) and the ids of `subset_file` each
    narrow the selection; an id the file does not hold is an error. `split` (LongMemEval only)
    keeps MemBuilder's sft / rl / test question ids. `qa_path` names PerLTQA's QA file when
    `dataset_path` is its memory file and the two are not side by side.
    """
    data_dir = Path(data_dir)
    path = Path(dataset_path) if dataset_path is not None else None
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r} (valid: {', '.join(DATASETS)})")
    if split is not None and name != "longmemeval":
        raise DatasetError(f"--split applies to longmemeval only, not {name}")
    if qa_path is not None and (name != "perltqa" or path is None):
        raise DatasetError("a PerLTQA QA file path needs the memory file as the dataset path")

    if name == "locomo":
        records = _locomo_records(path or _locomo_file(data_dir))
    elif name == "longmemeval":
        records = _longmemeval_records(path or _longmemeval_file(data_dir), data_dir)
    elif name == "perltqa":
        records = _perltqa_records(*_perltqa_files(data_dir, path, Path(qa_path) if qa_path is not None else None))
    elif name == "demo":
        from eval.demo_data import DEMO

        records = _eager([Sample.from_dict(d, "demo sample") for d in DEMO])
    else:
        if path is None:
            raise DatasetError("--dataset dialogues needs --dataset-path (a JSON list of samples)")
        records = _eager(load_dialogues(path))

    ids = [rid for rid, _ in records]
    all_ids = set(ids)
    keep = set(ids)
    filters: list[tuple[str, list[str]]] = []
    for label, given in (("sample id", sample_ids), ("character id", character_ids)):
        if given:
            filters.append((label, [given] if isinstance(given, str) else [str(x) for x in given]))
    if subset_file is not None:
        filters.append((f"id from {subset_file}", read_id_file(subset_file)))
    for label, wanted in filters:
        unknown = [w for w in wanted if w not in all_ids]
        if unknown:
            raise DatasetError(f"unknown {label} {_some(unknown, 3)} for {name}; valid ids include {_some(ids)}")
        keep &= set(wanted)
    if split is not None:
        splits = load_splits(data_dir)
        if split not in splits:
            raise DatasetError(f"unknown split {split!r} (valid: {', '.join(sorted(splits))})")
        in_split = set(splits[split])
        outside = [i for i in keep if i not in in_split]
        if filters and outside:
            raise DatasetError(f"{_some(sorted(outside), 3)} not in split {split!r}")
        keep &= in_split
        if not keep:
            raise DatasetError(f"no instance of split {split!r} in the LongMemEval file ({len(ids)} instances)")
    return [build() for rid, build in records if rid in keep]
