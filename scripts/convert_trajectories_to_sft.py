"""Expert trajectories -> a LLaMA-Factory SFT dataset: one sample per agent call.

Each sample's prompt is the exact prompt the expert saw (its system message and its user message) and its target
is the expert's own JSON output (PAPER §5; the public converter wrote the post-action memory instead). Records use
LLaMA-Factory's alpaca format with a system column:

    {"system": <system message>, "instruction": <user message>, "input": "", "output": <expert JSON>}

and the dataset's `dataset_info.json` entry is written beside the data file (merged into an existing one).

Targets: the expert's raw output when it is a bare JSON object; when the expert wrapped it (code fences, a think
block, prose) the JSON object is cut out verbatim; only an output that needed repair is re-serialised. Every target
parses with `memory_system.parse_actions` for its agent. Skipped, each with its reason: failed calls, outputs that do
not parse, prompts of an unsupported shape, and samples longer than `--max-length` tokens (prompt rendered with the
tokenizer's chat template plus the target; without `--tokenizer` tokens are estimated as characters / 4).

    python scripts/convert_trajectories_to_sft.py --trajectory-dir expert_trajectories/longmemeval \
        --output-file data/sft/membuilder_sft.json --max-length 20000 --tokenizer Qwen/Qwen3-4B-Instruct-2507
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_client import _first_balanced_object, extract_json, fenced_block, strip_reasoning  # noqa: E402
from memory_store import StoreError, atomic_write_text, check_output_file  # noqa: E402
from memory_system import AGENTS, ActionFormatError, parse_actions  # noqa: E402
from training import trajectories as tj  # noqa: E402

DEFAULT_DATASET_NAME = "membuilder_sft"
DEFAULT_MAX_LENGTH = 20000
DATASET_INFO_FILE = "dataset_info.json"


class Skip(Exception):
    """A call that does not become a sample; the message is the reason (grouped in the summary by its first part)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


# --------------------------------------------------------------------------- targets

def expert_json_text(agent: str, raw: str | None) -> tuple[str, str]:
    """(the expert's JSON output as training target, how it was obtained: "raw" | "unwrapped" | "repaired").

    Raises Skip when the output is missing or does not parse as this agent's actions."""
    if raw is None or not str(raw).strip():
        raise Skip("no output")
    try:
        parse_actions(agent, raw)
    except ActionFormatError as exc:
        raise Skip("unparseable output", exc.reason) from None
    text = raw.strip()
    try:
        if isinstance(json.loads(text), dict):
            return text, "raw"
    except json.JSONDecodeError:
        pass
    body = strip_reasoning(raw)
    fenced = fenced_block(body)
    for cand in ([fenced] if fenced is not None else []) + [body]:
        obj_text = _first_balanced_object(cand)
        if obj_text is None:
            continue
        try:
            if isinstance(json.loads(obj_text), dict):
                parse_actions(agent, obj_text)
                return obj_text, "unwrapped"
        except (json.JSONDecodeError, ActionFormatError):
            continue
    return json.dumps(extract_json(raw), ensure_ascii=False), "repaired"


def split_prompt(messages) -> tuple[str, str]:
    """(system, user) of a recorded prompt; alpaca holds one optional system message and one user turn."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        raise Skip("unsupported prompt shape", "messages are not a list of {role, content}")
    roles = [m.get("role") for m in messages]
    if roles == ["system", "user"]:
        return messages[0]["content"], messages[1]["content"]
    if roles == ["user"]:
        return "", messages[0]["content"]
    raise Skip("unsupported prompt shape", f"roles {roles}")


# --------------------------------------------------------------------------- token counting

class TokenCounter:
    """Length of a sample as the model sees it: the chat-templated prompt plus the target."""

    def __init__(self, tokenizer_path: str | None):
        self.tokenizer = None
        self.estimated = tokenizer_path is None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)

    def count(self, messages: list[dict], output: str) -> int:
        if self.tokenizer is None:
            return (sum(len(m["content"]) for m in messages) + len(output)) // 4
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return len(ids)
        return sum(len(tok.encode(m["content"], add_special_tokens=False)) for m in messages) + \
            len(tok.encode(output, add_special_tokens=False))


# --------------------------------------------------------------------------- conversion

@dataclass
class Conversion:
    records: list[dict] = field(default_factory=list)
    kept_by_agent: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    target_kinds: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    dialogues: int = 0
    dialogues_skipped: list[str] = field(default_factory=list)
    max_tokens_kept: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def call_to_record(call: dict, count: Callable[[list[dict], str], int], max_length: int) -> tuple[dict, str, int]:
    """(LLaMA-Factory record, target kind, token count) for one agent call, or raises Skip."""
    agent = call.get("agent")
    if agent not in AGENTS:
        raise Skip("unknown agent", repr(agent))
    if call.get("error"):
        raise Skip("failed call", str(call["error"])[:200])
    system, user = split_prompt(call.get("messages"))
    output, kind = expert_json_text(agent, call.get("raw_output"))
    n_tokens = count(call["messages"], output)
    if n_tokens > max_length:
        raise Skip("over --max-length", f"{n_tokens} tokens > {max_length}")
    return {"system": system, "instruction": user, "input": "", "output": output}, kind, n_tokens


def convert(dialogues: list[tj.Dialogue], counter: TokenCounter, max_length: int) -> Conversion:
    conv = Conversion()
    for d in dialogues:
        conv.dialogues += 1
        for call in d.calls:
            try:
                rec, kind, n = call_to_record(call, counter.count, max_length)
            except Skip as exc:
                conv.skipped[exc.kind] += 1
                conv.skipped_examples.setdefault(exc.kind, f"{call.get('call_id')}: {exc}")
                continue
            conv.records.append(rec)
            conv.kept_by_agent[call["agent"]] += 1
            conv.target_kinds[kind] += 1
            conv.max_tokens_kept = max(conv.max_tokens_kept, n)
    return conv


def dataset_info_entry(file_name: str) -> dict:
    return {"file_name": file_name, "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}}


def write_dataset(records: list[dict], output_file: Path, dataset_name: str) -> Path:
    """The data file (a JSON list, or JSON lines for a .jsonl name) and its entry in the dataset_info.json beside it."""
    output_file.parent.mkdir(parents=True, exist_ok=True)
    if output_file.suffix == ".jsonl":
        atomic_write_text(output_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        atomic_write_text(output_file, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    info_path = output_file.parent / DATASET_INFO_FILE
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise tj.TrajectoryError(f"{info_path} exists but is not valid JSON; fix or remove it") from None
        if not isinstance(info, dict):
            raise tj.TrajectoryError(f"{info_path} exists but is not a JSON object; fix or remove it")
    info[dataset_name] = dataset_info_entry(output_file.name)
    atomic_write_text(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return info_path


def load_dialogues(root: str | Path, *, include_unfinished: bool = False) -> tuple[list[tj.Dialogue], list[str]]:
    """Finished dialogues under root (unfinished ones are listed as skipped unless included)."""
    dialogues, skipped = [], []
    for path in tj.find_dialogues(root):
        meta = tj.read_json(path / tj.METADATA_FILE, "trajectory metadata")
        if meta.get("status") != tj.STATUS_COMPLETE and not include_unfinished:
            skipped.append(f"{path}: not finished ({meta.get('sessions_done', 0)}/{meta.get('n_sessions', '?')} "
                           "sessions); resume the generator first")
            continue
        dialogues.append(tj.load_dialogue(path, require_complete=not include_unfinished))
    return dialogues, skipped


# --------------------------------------------------------------------------- CLI

def build_parser() -> tj.OneLineParser:
    p = tj.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectory-dir", "--trajectories-dir", dest="trajectory_dir", default="expert_trajectories",
                   help="a dialogue folder, a dataset folder or the trajectories root (default expert_trajectories)")
    p.add_argument("--output-file", default="data/sft/membuilder_sft.json",
                   help="the data file (.json: a JSON list; .jsonl: JSON lines); default data/sft/membuilder_sft.json")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"skip samples longer than this many tokens (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--tokenizer", help="tokenizer path or name to count tokens with (default: characters / 4)")
    p.add_argument("--dataset-name", default=DEFAULT_DATASET_NAME, help="name of the dataset_info.json entry")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also use the finished sessions of dialogues whose generation has not ended")
    p.add_argument("--allow-test-split", action="store_true",
                   help="allow dialogues of held-out LongMemEval test instances (refused by default)")
    return p


def main(argv: list[str] | None = None) -> int:
    return tj.cli_exit(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_length < 1:
            raise tj.TrajectoryError("--max-length must be at least 1")
        check_output_file(args.output_file, "--output-file")
        dialogues, unfinished = load_dialogues(args.trajectory_dir, include_unfinished=args.include_unfinished)
        tj.refuse_test_split(((d.dataset, d.sample_id) for d in dialogues), args.allow_test_split, "dialogue")
        if not dialogues:
            raise tj.TrajectoryError(f"no finished dialogue under {args.trajectory_dir} ({len(unfinished)} unfinished)")
        try:
            counter = TokenCounter(args.tokenizer)
        except Exception as exc:  # noqa: BLE001 - transformers raises assorted errors for a bad path
            raise tj.TrajectoryError(f"cannot load tokenizer {args.tokenizer!r}: {str(exc).splitlines()[0]}") from None
        conv = convert(dialogues, counter, args.max_length)
        if not conv.records:
            raise tj.TrajectoryError(f"no usable agent call in {len(dialogues)} dialogue(s) "
                                     f"(skipped: {dict(conv.skipped)})")
        info_path = write_dataset(conv.records, Path(args.output_file), args.dataset_name)
    except (tj.TrajectoryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = len(conv.records) + conv.n_skipped
    print(f"SFT data -> {args.output_file} ({DATASET_INFO_FILE} entry {args.dataset_name!r} in {info_path})")
    print(f"  dialogues: {len(dialogues)} used, {len(unfinished)} unfinished skipped")
    print(f"  agent calls: {total}   kept: {len(conv.records)}   skipped: {conv.n_skipped}")
    print("  kept per agent: " + ", ".join(f"{a} {conv.kept_by_agent.get(a, 0)}" for a in AGENTS))
    print("  targets: " + ", ".join(f"{k} {v}" for k, v in sorted(conv.target_kinds.items())))
    for kind, n in conv.skipped.most_common():
        print(f"  skipped {n:5d}: {kind}   e.g. {conv.skipped_examples[kind][:160]}")
    for line in unfinished:
        print(f"  skipped dialogue {line}")
    how = f"tokenizer {args.tokenizer}" if args.tokenizer else "estimated as characters / 4 (no --tokenizer given)"
    print(f"  lengths: longest kept sample {conv.max_tokens_kept} tokens, limit {args.max_length}; token counts {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
