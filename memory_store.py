"""How memory and run files live on disk: atomic writes, folder locks, path checks and store validation.

Nothing here knows memory semantics (that is `memory_system.py`); everything that writes a file the user keeps goes
through `atomic_write_text` / `atomic_write_bytes` (a temporary file in the same folder, fsync, rename; mode 0644
under the usual umask), and every folder a run writes into is checked up front (`check_output_dir`) and locked for
the run (`FolderLock`: an advisory `flock`, released by the kernel when the process dies, so a killed run's lock is
taken over without any clean-up).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

LOCK_FILE = ".lock"
LOG_FILE = "log.jsonl"  # a sample memory's session records since its last compaction (memory_system.MemorySystem)
VECTORS_FILE = "vectors.f32"  # their entries' vectors, raw float32 rows, in entry order
IO_STATS = {"bytes_written": 0}  # every byte this process wrote through this module (benchmarks read it)


class StoreError(Exception):
    """A user-facing storage problem (a path that is not a folder, unwritable, locked, corrupt): one line, exit 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MemoryStoreError(StoreError):
    """A memory folder that cannot be read; the message says which file and how to recover."""


class FolderInUseError(StoreError):
    """Another live process holds the folder's lock."""


# --------------------------------------------------------------------------- atomic writes

def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files; outputs should read like any other written file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        IO_STATS["bytes_written"] += len(data)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records in one write and fsync: a killed writer leaves at most a torn last line."""
    append_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    IO_STATS["bytes_written"] += len(data)


def read_jsonl_records(path: str | os.PathLike) -> list[dict]:
    """The complete JSON-object lines of a file (a torn or foreign line is skipped); [] when it does not exist."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --------------------------------------------------------------------------- path checks

def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create `path` if needed and prove it is a writable folder; StoreError (one line, with the flag) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{flag} {path} exists and is not a folder: pass another {flag} or remove the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = "a parent of it is a file"
        raise StoreError(f"{flag} {path} is not writable ({reason}): pass another {flag}") from None
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """The folder of an output file must be writable and the file itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{flag} {path} is a folder: pass a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), f"the folder of {flag}")
    return path


# --------------------------------------------------------------------------- locks

class FolderLock:
    """An advisory lock on a folder (`<folder>/.lock`): exclusive for writers, shared for readers.

    The kernel drops a `flock` when its process dies, so a stale lock from a killed run is taken over by the next
    run with no clean-up. The holder of an exclusive lock writes its PID into the file for the error message.
    """

    def __init__(self, folder: str | os.PathLike, *, exclusive: bool = True, what: str = "folder"):
        self.folder = Path(folder)
        self.exclusive = exclusive
        self.what = what
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads((self.folder / LOCK_FILE).read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("pid"):
            host = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
            return f"PID {info['pid']}{host}"
        return "another process"

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(f"{self.what} {self.folder} is in use by {self._holder()}: wait for that run to "
                                   "finish or use another folder") from None
        if self.exclusive:
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                if self.exclusive:
                    os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextmanager
def locked(folders: Iterable[tuple[str | os.PathLike, bool, str]]) -> Iterator[list[FolderLock]]:
    """Lock every (folder, exclusive, what) at once, in a fixed order; all or none."""
    with ExitStack() as stack:
        locks = []
        for folder, exclusive, what in sorted({(str(Path(f)), e, w) for f, e, w in folders}):
            locks.append(stack.enter_context(FolderLock(folder, exclusive=exclusive, what=what)))
        yield locks


# --------------------------------------------------------------------------- memory folder files

def _recovery(folder: Path) -> str:
    return f"delete {folder} to rebuild that memory from scratch (or restore it from a backup)"


def read_memory_file(path: str | os.PathLike) -> dict:
    """memory.json as a checked dict: {"core": str, "entries": [{"id", "type", "text", ...}], "meta": {...}}."""
    path = Path(path)
    folder = path.parent
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MemoryStoreError(f"no memory at {path}") from None
    except IsADirectoryError:
        raise MemoryStoreError(f"{path} is a folder, not a memory file: {_recovery(folder)}") from None
    except OSError as exc:
        raise MemoryStoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MemoryStoreError(f"{path} is not UTF-8 text (byte {exc.start}): {_recovery(folder)}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MemoryStoreError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}): {_recovery(folder)}") from None
    problem = memory_shape_problem(data)
    if problem:
        raise MemoryStoreError(f"{path} is not a memory file ({problem}): {_recovery(folder)}")
    return data


def memory_shape_problem(data: Any) -> str | None:
    """Why `data` is not a memory.json document, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, expected an object"
    if "core" not in data or "entries" not in data:
        return "no 'core' and 'entries'"
    if not isinstance(data["core"], str):
        return "'core' is not text"
    if not isinstance(data["entries"], list):
        return "'entries' is not a list"
    for i, e in enumerate(data["entries"]):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("id", "type", "text")):
            return f"entry {i} lacks a text 'id', 'type' or 'text'"
        if not isinstance(e.get("supersedes", []), list):
            return f"entry {i}: 'supersedes' is not a list"
    if not isinstance(data.get("meta", {}), dict):
        return "'meta' is not an object"
    return None


def read_faiss_index(path: str | os.PathLike):
    """A FAISS index from disk; MemoryStoreError with a recovery hint when the file is truncated or not an index."""
    import faiss

    path = Path(path)
    try:
        return faiss.read_index(str(path))
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with a C++ message for any bad file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise MemoryStoreError(f"{path} is not a readable FAISS index ({first}): {_recovery(path.parent)}") from None


def write_faiss_index(index, path: str | os.PathLike) -> None:
    import faiss

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.chmod(tmp, FILE_MODE)
        IO_STATS["bytes_written"] += os.path.getsize(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- the append-only session log

class SessionLog:
    """The incremental half of a sample's store: what sessions added since the last compaction.

    A save appends the session's vectors to `vectors.f32`, then its record to `log.jsonl` (each write fsync'd), so
    its cost is what the session added, not the size of the memory. A crash leaves at most vectors without their
    record, or a torn last record: `read` drops both. Compaction (memory_system) rewrites memory.json and
    index.faiss whole and then `clear`s the log; a crash between the two leaves a log the snapshot already covers,
    which `read` recognises and drops.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.log_path = self.folder / LOG_FILE
        self.vec_path = self.folder / VECTORS_FILE

    def exists(self) -> bool:
        return self.log_path.exists() or self.vec_path.exists()

    def append(self, record: dict, vectors: "Any | None") -> None:
        import numpy as np

        if vectors is not None and len(vectors):
            append_bytes(self.vec_path, np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        _test_crash_point(record)
        append_jsonl(self.log_path, [record])

    def clear(self) -> None:
        for p in (self.log_path, self.vec_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def read(self, snapshot_seq: int, snapshot_entries: int) -> tuple[list[dict], "Any"]:
        """(the records newer than the snapshot, their entries' vectors as an (n, dim) array); debris is dropped
        on disk (we hold the folder's lock): a torn last record, vectors without a record, a covered log."""
        import numpy as np

        try:
            raw = self.log_path.read_bytes()
        except FileNotFoundError:
            raw = b""
        records, good = [], 0
        for line in raw.split(b"\n"):
            if not line.endswith(b"}"):
                break  # a torn last record (or the empty tail after the final newline)
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or \
                    not isinstance(rec.get("first_entry"), int):
                raise MemoryStoreError(f"{self.log_path} holds a line that is not a session record: "
                                       f"{_recovery(self.folder)}")
            records.append(rec)
            good += len(line) + 1
        if good < len(raw):
            with open(self.log_path, "r+b") as fh:  # the next append must start on a clean line
                fh.truncate(good)
        covered = [r for r in records if r["seq"] <= snapshot_seq]
        new = records[len(covered):]
        if any(r["seq"] <= snapshot_seq for r in new):
            raise MemoryStoreError(f"{self.log_path} is out of order: {_recovery(self.folder)}")
        if not new:
            self.clear()  # nothing past the snapshot (a compaction that did not get to remove the log)
            return [], np.zeros((0, 0), dtype=np.float32)
        if new[0]["first_entry"] != snapshot_entries:
            raise MemoryStoreError(f"{self.log_path} continues at entry {new[0]['first_entry']}, but the snapshot "
                                   f"holds {snapshot_entries}: {_recovery(self.folder)}")
        skip = sum(len(r.get("entries") or []) for r in covered)
        n_vecs = sum(len(r.get("entries") or []) for r in new)
        dim = next((int(r["dim"]) for r in records if r.get("dim")), 0)
        if not n_vecs:
            return new, np.zeros((0, dim), dtype=np.float32)
        try:
            data = self.vec_path.read_bytes()
        except FileNotFoundError:
            data = b""
        row = 4 * dim
        need = (skip + n_vecs) * row
        if dim <= 0 or len(data) < need:
            raise MemoryStoreError(f"{self.vec_path} holds {len(data) // max(row, 1)} vectors for the "
                                   f"{skip + n_vecs} entries of {self.log_path}: {_recovery(self.folder)}")
        if len(data) > need:  # vectors whose record a crash never wrote
            with open(self.vec_path, "r+b") as fh:
                fh.truncate(need)
        vec = np.frombuffer(data[skip * row: need], dtype="<f4").reshape(n_vecs, dim).astype(np.float32)
        return new, vec


def _test_crash_point(record: dict) -> None:
    """Tests kill the process between a record's vectors and the record itself (MEMBUILDER_TEST_CRASH_AT_APPEND=n:
    at the n-th record with entries), the window a crash-safe store must survive."""
    at = os.environ.get("MEMBUILDER_TEST_CRASH_AT_APPEND")
    if at and record.get("entries") and int(record.get("seq", 0)) >= int(at):
        os._exit(137)
