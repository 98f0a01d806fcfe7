#!/usr/bin/env python3
"""Convert PerLTQA's memory and QA files into the project's dialogue format (a JSON list of samples).

    python scripts/process_perltqa.py --input data/perltqa --output data/perltqa/dialogues.json
    python scripts/process_perltqa.py --input mem.json --qa-input qa.json --character "Wang Xiaoming" --output out.json

--input is the folder holding perltmem_en_v2.json and perltqa_en_v2.json (or the v1 names), or the
memory file itself (its QA file is then found beside it, or given with --qa-input). One sample per
protagonist: dialogues and events become dated sessions (see eval/datasets.py, which does the parsing).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.datasets import DatasetError, load_dataset, save_dialogues  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=None,
                   help="folder with both PerLTQA files, or the memory file (default: data-dir/perltqa)")
    p.add_argument("--qa-input", type=Path, default=None, help="the QA file, when --input is a memory file elsewhere")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--output", type=Path, required=True, help="dialogue-format JSON to write")
    p.add_argument("--character", nargs="+", action="extend", default=None, metavar="NAME",
                   help="keep only these protagonists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.qa_input is not None and args.input is None:
        print("error: --qa-input needs --input (the memory file)", file=sys.stderr)
        return 2
    try:
        samples = load_dataset("perltqa", data_dir=args.data_dir, dataset_path=args.input, qa_path=args.qa_input,
                               character_ids=args.character)
        save_dialogues(samples, args.output)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    sessions = sum(len(s.sessions) for s in samples)
    types = Counter(q.type for s in samples for q in s.questions)
    print(f"wrote {args.output}: {len(samples)} protagonists, {sessions} sessions, {sum(types.values())} questions "
          f"({', '.join(f'{t} {n}' for t, n in sorted(types.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
