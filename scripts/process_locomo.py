#!/usr/bin/env python3
"""Convert LoCoMo's locomo10.json into the project's dialogue format (a JSON list of samples).

    python scripts/process_locomo.py --input data/locomo/locomo10.json --output data/locomo/dialogues.json
    python -m eval.runner --dataset dialogues --dataset-path data/locomo/dialogues.json ...

The parsing is eval/datasets.py's (`load_dataset("locomo")`); this script only selects and writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.datasets import DatasetError, load_dataset, save_dialogues  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=None,
                   help="raw LoCoMo file (default: data-dir/locomo/locomo10.json, see eval/datasets.py)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--output", type=Path, required=True, help="dialogue-format JSON to write")
    p.add_argument("--conv-id", nargs="+", action="extend", default=None, metavar="ID",
                   help="keep only these sample ids (e.g. conv-26)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        samples = load_dataset("locomo", data_dir=args.data_dir, dataset_path=args.input, sample_ids=args.conv_id)
        save_dialogues(samples, args.output)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    sessions = sum(len(s.sessions) for s in samples)
    turns = sum(len(x.messages) for s in samples for x in s.sessions)
    questions = sum(len(s.questions) for s in samples)
    print(f"wrote {args.output}: {len(samples)} conversations, {sessions} sessions, {turns} turns, {questions} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
