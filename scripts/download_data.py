#!/usr/bin/env python3
"""Download the benchmark files into data/ (the only place in the project that names their hosts).

    python scripts/download_data.py --datasets locomo longmemeval perltqa --data-dir data

Files already present are kept (--force downloads again). Each file is written to a temporary file
beside its destination and renamed into place, so an interrupted download never leaves a truncated
file under the name the loaders read. Without network access the script prints what to download and
where to put it, and exits with status 2.

--mirror URL (or MEMBUILDER_DATA_MIRROR) fetches every file from URL/<path under data/> instead,
e.g. URL/locomo/locomo10.json: for a local mirror, and for tests, which never reach the internet.
The LongMemEval splits (data/longmemeval/splits/longmemeval_splits.json) ship with the repository.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MIRROR_ENV = "MEMBUILDER_DATA_MIRROR"
_GITHUB_RAW = "https://raw.githubusercontent.com"
_HF_LONGMEMEVAL = "https://huggingface.co/datasets/xiaowu0162/longmemeval-cleaned/resolve/main"


@dataclass(frozen=True)
class RemoteFile:
    dest: str  # path under the data folder
    urls: tuple[str, ...]  # tried in order


def _perltqa(name: str) -> RemoteFile:
    return RemoteFile(
        f"perltqa/{name}",
        tuple(f"{_GITHUB_RAW}/Elvin-Yiming-Du/PerLTQA/{branch}/Dataset/en_v2/{name}" for branch in ("main", "master")),
    )


LONGMEMEVAL_VARIANTS = {"s": "longmemeval_s_cleaned.json", "m": "longmemeval_m_cleaned.json", "oracle": "longmemeval_oracle.json"}


def remote_files(dataset: str, longmemeval_variant: str = "s") -> list[RemoteFile]:
    if dataset == "locomo":
        return [RemoteFile("locomo/locomo10.json", (f"{_GITHUB_RAW}/snap-research/locomo/main/data/locomo10.json",))]
    if dataset == "longmemeval":
        name = LONGMEMEVAL_VARIANTS[longmemeval_variant]
        return [RemoteFile(f"longmemeval/{name}", (f"{_HF_LONGMEMEVAL}/{name}",))]
    if dataset == "perltqa":
        return [_perltqa("perltmem_en_v2.json"), _perltqa("perltqa_en_v2.json")]
    raise ValueError(dataset)


class DownloadError(Exception):
    pass


def fetch(url: str, dest: Path, timeout: float) -> int:
    """Stream url into dest atomically; returns the byte count. Raises DownloadError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "membuilder-download/1.0"})
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            first = b""
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    if not first:
                        first = chunk.lstrip()[:1]
                    out.write(chunk)
                    bar.update(len(chunk))
        if first not in (b"[", b"{"):  # an HTML error page or an empty body is not a dataset
            raise DownloadError(f"{url} did not return JSON")
        size = Path(tmp).stat().st_size
        os.replace(tmp, dest)
        return size
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{url}: {reason}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def download(files: list[RemoteFile], data_dir: Path, *, mirror: str | None, force: bool, timeout: float) -> list[tuple[RemoteFile, str]]:
    """Fetch each missing file; returns (file, last error) for those that could not be fetched."""
    failed = []
    for rf in files:
        dest = data_dir / rf.dest
        if dest.is_file() and not force:
            print(f"{dest}: present, kept (use --force to download again)")
            continue
        urls = (f"{mirror.rstrip('/')}/{rf.dest}",) if mirror else rf.urls
        error = ""
        for url in urls:
            try:
                size = fetch(url, dest, timeout)
                print(f"{dest}: {size / 1e6:.1f} MB from {url}")
                break
            except DownloadError as e:
                error = str(e)
        else:
            failed.append((rf, error))
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=("locomo", "longmemeval", "perltqa"),
                   default=["locomo", "longmemeval", "perltqa"])
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--longmemeval-variant", choices=tuple(LONGMEMEVAL_VARIANTS), default="s")
    p.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or None,
                   help=f"fetch from MIRROR/<path under data> instead (env {MIRROR_ENV})")
    p.add_argument("--force", action="store_true", help="download files that are already present")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a connection or data")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = [rf for name in args.datasets for rf in remote_files(name, args.longmemeval_variant)]
    failed = download(files, args.data_dir, mirror=args.mirror, force=args.force, timeout=args.timeout)
    if not failed:
        return 0
    lines = [f"could not download {len(failed)} file(s) (no network?). Download them by hand and place them as shown:"]
    for rf, error in failed:
        lines.append(f"  {args.data_dir / rf.dest}")
        lines.append(f"      <- {rf.urls[0]}")
        lines.append(f"      (last error: {error})")
    print("\n".join(lines), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
