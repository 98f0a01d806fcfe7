"""The on-disk layout of expert trajectories, shared by the generator and both converters.

One folder per dialogue, `<output-dir>/<dataset>/<sample_id>/`:

    states/state_<i>/     the full memory BEFORE session i (`MemorySystem.save`); `state_<n>` is the final memory
    agent_calls.jsonl     one line per agent call (see `call_record`), sessions in order, 4 lines per session
    metadata.json         the dialogue: ids, settings, sessions, progress (`status`: "in_progress" | "complete")
    qa_cache.jsonl        synthetic session QA (written by prepare_rl_data / qa_generator), one line per session

Durability: a session is finished when its four call lines are in `agent_calls.jsonl` AND `states/state_<i+1>`
exists. The generator appends the lines first (one write, fsync) and then renames the complete state folder into
place, so a killed run resumes at the first session that is not finished (`plan_resume`); whatever a killed run
left behind for later sessions (a partial last line, call lines without their state) is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from memory_store import atomic_write_text
from memory_system import AGENTS

STATES_DIR = "states"
CALLS_FILE = "agent_calls.jsonl"
METADATA_FILE = "metadata.json"
QA_CACHE_FILE = "qa_cache.jsonl"
STATUS_COMPLETE = "complete"
STATUS_IN_PROGRESS = "in_progress"
FORMAT_VERSION = 1


class TrajectoryError(Exception):
    """A user error in a trajectory folder (missing, corrupt, inconsistent); the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def cli_exit(main_fn) -> int:
    """Run a CLI's main: Ctrl-C is one line and exit code 130 (finished work is on disk), never a traceback."""
    try:
        return main_fn()
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130


def test_split_ids() -> set[str]:
    """LongMemEval question ids of MemBuilder's held-out `test` split (the committed splits file)."""
    from eval.datasets import load_splits

    return set(load_splits().get("test", []))


def refuse_test_split(items: Iterable[tuple[str, str]], allow: bool, what: str = "instance") -> None:
    """TrajectoryError when any (dataset, sample id) is a held-out LongMemEval test instance, unless `allow`."""
    if allow:
        return
    held_out = test_split_ids()
    bad = sorted({sid for ds, sid in items if str(ds).startswith("longmemeval") and str(sid) in held_out})
    if bad:
        raise TrajectoryError(f"{len(bad)} {what}(s) of the held-out LongMemEval test split (e.g. {bad[0]}): training "
                              "on them leaks the evaluation set; pass --allow-test-split if you mean it")


# --------------------------------------------------------------------------- paths

_UNSAFE = re.compile(r"[^\w.\-+@=]+")


def safe_name(sample_id: str) -> str:
    """A folder name for a sample id (ids with path separators or odd characters are folded to '_')."""
    name = _UNSAFE.sub("_", str(sample_id)).strip("._") or "sample"
    return name[:120]


def state_name(i: int) -> str:
    return f"state_{i}"


def state_dir(dialogue_dir: str | os.PathLike, i: int) -> Path:
    return Path(dialogue_dir) / STATES_DIR / state_name(i)


def state_relpath(i: int) -> str:
    return f"{STATES_DIR}/{state_name(i)}"


def existing_states(dialogue_dir: str | os.PathLike) -> set[int]:
    """Indices of the complete state folders (those holding memory.json)."""
    root = Path(dialogue_dir) / STATES_DIR
    out = set()
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"state_(\d+)", p.name)
            if m and p.is_dir() and (p / "memory.json").is_file():
                out.add(int(m.group(1)))
    return out


def find_dialogues(root: str | os.PathLike) -> list[Path]:
    """Dialogue folders under `root` (a dialogue folder itself, a dataset folder or the trajectories root)."""
    root = Path(root)
    if not root.exists():
        raise TrajectoryError(f"trajectory folder not found: {root}")
    if not root.is_dir():
        raise TrajectoryError(f"trajectory path is not a folder: {root}")
    if (root / METADATA_FILE).is_file():
        return [root]
    found = sorted({p.parent for p in root.rglob(METADATA_FILE) if STATES_DIR not in p.parent.parts[len(root.parts):]})
    if not found:
        raise TrajectoryError(f"no trajectories under {root} (no {METADATA_FILE} found)")
    return found


# --------------------------------------------------------------------------- JSONL

def read_jsonl(path: str | os.PathLike, *, allow_partial_tail: bool, what: str = "file") -> tuple[list[dict], bool]:
    """Records of a JSONL file and whether a partial last line was dropped.

    A last line without its newline (or that does not parse) is what a killed writer leaves: it is dropped when
    `allow_partial_tail`, and an error otherwise. A bad line before the last one is always corruption.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        raise TrajectoryError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records: list[dict] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n == len(lines) and not tail.strip():
                # the last complete-looking line does not parse: a torn write that happened to end in a newline
                if allow_partial_tail:
                    return records, True
                raise TrajectoryError(f"{what} {path} is truncated: line {n} is not valid JSON") from None
            raise TrajectoryError(f"{what} {path} is corrupt: line {n} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise TrajectoryError(f"{what} {path} is corrupt: line {n} is not a JSON object")
        records.append(rec)
    if tail.strip():
        if not allow_partial_tail:
            raise TrajectoryError(f"{what} {path} is truncated: its last line (line {len(lines) + 1}) is incomplete")
        return records, True
    return records, False


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records in one write and fsync, so a session's lines land together or (if killed) as a torn tail."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrajectoryError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrajectoryError(f"{what} {path} is not valid JSON: {exc}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


# --------------------------------------------------------------------------- resume

@dataclass
class ResumePlan:
    """Where a dialogue's generation goes on: sessions [0, start) are finished and their calls are kept."""

    start: int
    kept_calls: list[dict]
    dropped_calls: int
    dropped_partial_line: bool
    stale_states: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.dropped_calls or self.dropped_partial_line or self.stale_states)


def session_calls(calls: Iterable[dict]) -> dict[int, dict[str, dict]]:
    """{session_index: {agent: call}}; the first record of a (session, agent) wins."""
    out: dict[int, dict[str, dict]] = {}
    for c in calls:
        try:
            i = int(c["session_index"])
            agent = str(c["agent"])
        except (KeyError, TypeError, ValueError):
            continue
        out.setdefault(i, {}).setdefault(agent, c)
    return out


def plan_resume(calls: list[dict], n_sessions: int, states: set[int], *, dropped_partial_line: bool = False) -> ResumePlan:
    """The first unfinished session, given the call records read and the complete state folders present.

    Session i is finished when all four agents' calls are recorded and state_<i+1> exists; state_0 must exist for
    anything to count. Calls and states of later sessions belong to an interrupted session and are dropped.
    """
    by_session = session_calls(calls)
    start = 0
    if 0 in states:
        while start < n_sessions and start + 1 in states and set(AGENTS) <= set(by_session.get(start, {})):
            start += 1
    kept: list[dict] = []
    seen: set[tuple[int, str]] = set()
    for c in calls:
        key = (int(c.get("session_index", -1)), str(c.get("agent")))
        if 0 <= key[0] < start and key not in seen:
            seen.add(key)
            kept.append(c)
    stale = sorted(s for s in states if s > start)
    return ResumePlan(start=start, kept_calls=kept, dropped_calls=len(calls) - len(kept),
                      dropped_partial_line=dropped_partial_line, stale_states=stale)


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def clean_temp_states(dialogue_dir: str | os.PathLike) -> None:
    root = Path(dialogue_dir) / STATES_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                remove_tree(p)


# --------------------------------------------------------------------------- reading finished dialogues

@dataclass
class Dialogue:
    """A finished (or, when allowed, partial) dialogue as the converters read it."""

    path: Path
    metadata: dict
    calls: list[dict]
    finished_sessions: int

    @property
    def sample_id(self) -> str:
        return str(self.metadata.get("sample_id", self.path.name))

    @property
    def dataset(self) -> str:
        return str(self.metadata.get("dataset", self.path.parent.name))

    @property
    def complete(self) -> bool:
        return self.metadata.get("status") == STATUS_COMPLETE

    def sessions(self) -> list[dict]:
        return list(self.metadata.get("sessions") or [])

    def calls_by_session(self) -> dict[int, dict[str, dict]]:
        return session_calls(self.calls)

    def state_path(self, i: int) -> Path:
        return state_dir(self.path, i)


def load_dialogue(path: str | os.PathLike, *, require_complete: bool = True) -> Dialogue:
    """Read and check one dialogue folder. A finished dialogue must be whole: every session's four calls, every
    state folder, and an agent_calls.jsonl that ends cleanly (a partial last line there is corruption)."""
    path = Path(path)
    if not path.is_dir():
        raise TrajectoryError(f"trajectory folder not found: {path}")
    meta = read_json(path / METADATA_FILE, "trajectory metadata")
    if not isinstance(meta, dict) or "sessions" not in meta:
        raise TrajectoryError(f"trajectory metadata {path / METADATA_FILE} has no 'sessions' list")
    complete = meta.get("status") == STATUS_COMPLETE
    if require_complete and not complete:
        raise TrajectoryError(f"trajectory {path} is not finished (status {meta.get('status')!r}); "
                              "run the generator again to resume it")
    calls_path = path / CALLS_FILE
    if not calls_path.is_file():
        raise TrajectoryError(f"{CALLS_FILE} not found in {path}")
    calls, partial = read_jsonl(calls_path, allow_partial_tail=not complete, what=CALLS_FILE)
    n = int(meta.get("n_sessions", len(meta["sessions"])))
    states = existing_states(path)
    plan = plan_resume(calls, n, states, dropped_partial_line=partial)
    if complete:
        by_session = session_calls(calls)
        for i in range(n):
            missing = [a for a in AGENTS if a not in by_session.get(i, {})]
            if missing:
                raise TrajectoryError(f"{calls_path} is incomplete: session {i} has no call for {', '.join(missing)}")
        absent = [i for i in range(n + 1) if i not in states]
        if absent:
            raise TrajectoryError(f"trajectory {path} is missing state folder(s) "
                                  f"{', '.join(state_relpath(i) for i in absent[:3])}")
        extra = len(calls) - 4 * n
        if extra > 0:
            raise TrajectoryError(f"{calls_path} holds {extra} call(s) beyond its {n} sessions")
        return Dialogue(path, meta, calls, n)
    return Dialogue(path, meta, plan.kept_calls, plan.start)


# --------------------------------------------------------------------------- call records

def call_record(*, sample_id: str, dataset: str, session_index: int, session_id: str, session_time: str | None,
                call: Any) -> dict:
    """One agent_calls.jsonl line from a `memory_system.AgentCall`."""
    d = call.to_dict() if hasattr(call, "to_dict") else dict(call)
    return {
        "call_id": f"{sample_id}/{session_index}/{d['agent']}",
        "sample_id": sample_id,
        "dataset": dataset,
        "session_index": session_index,
        "session_id": session_id,
        "session_time": session_time,
        "state_before": state_relpath(session_index),
        **d,
    }
