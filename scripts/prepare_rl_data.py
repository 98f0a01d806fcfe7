"""Expert trajectories -> veRL parquet for ADRPO: one row per (session, agent).

A row's prompt is the exact prompt recorded for that agent, built from the EXPERT's pre-session memory: the policy
makes a one-step decision per session and never rolls its own memory forward (PAPER §5). `extra_info` carries what
the reward function needs: the pre-session state folder, the session's synthetic QA, and every agent's expert
output for that session (the length-penalty reference). Columns and keys: docs/interfaces.md, "RL parquet rows".

Synthetic QA (qa_generator.py) is generated with `--add-qa`, cached per dialogue in `qa_cache.jsonl` (resumable:
a rerun only asks for the sessions still missing); without `--add-qa` whatever is cached is used. With `--add-qa`,
sessions whose QA could not be generated are left out (their reward would be undefined) and listed.

    python scripts/prepare_rl_data.py --trajectories-dir expert_trajectories/longmemeval --output-file data/rl/train.parquet \
        --add-qa --qa-per-session 5 --provider openai --model claude-4.5-opus
"""
from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from llm_client import AVAILABLE_PROVIDERS  # noqa: E402
from memory_system import AGENTS  # noqa: E402
from scripts.convert_trajectories_to_sft import Skip, expert_json_text  # noqa: E402
from training import trajectories as tj  # noqa: E402

DATA_SOURCE = "membuilder"
ABILITY = "memory"
QA_FIELDS = ("question", "answer", "type", "source")


def rl_schema():
    """The parquet schema, explicit so that empty QA lists and missing expert outputs keep their types."""
    import pyarrow as pa

    qa = pa.struct([(k, pa.string()) for k in QA_FIELDS])
    extra = pa.struct([
        ("index", pa.int64()),
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("session_index", pa.int64()),
        ("session_id", pa.string()),
        ("session_time", pa.string()),
        ("session_group_id", pa.string()),
        ("agent", pa.string()),
        ("state_path", pa.string()),
        ("qa_pairs", pa.list_(qa)),
        ("expert_outputs", pa.struct([(a, pa.string()) for a in AGENTS])),
        ("expert_valid", pa.bool_()),
    ])
    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", extra),
    ])


def session_group_id(dataset: str, sample_id: str, session_index: int) -> str:
    return f"{dataset}/{sample_id}/{session_index}"


def expert_outputs_of(calls: dict[str, dict]) -> tuple[dict[str, str], dict[str, bool]]:
    """Each agent's expert JSON output ("" when the call failed or its output does not parse) and its validity."""
    outs, valid = {}, {}
    for agent in AGENTS:
        call = calls.get(agent) or {}
        try:
            if call.get("error"):
                raise Skip("failed call")
            outs[agent], _ = expert_json_text(agent, call.get("raw_output"))
            valid[agent] = True
        except Skip:
            outs[agent], valid[agent] = "", False
    return outs, valid


def clean_prompt(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise Skip("unsupported prompt shape")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def qa_pairs_of(record: dict | None) -> list[dict]:
    pairs = []
    for p in (record or {}).get("pairs") or []:
        if all(isinstance(p.get(k), str) and p.get(k) for k in QA_FIELDS):
            pairs.append({k: p[k] for k in QA_FIELDS})
    return pairs


@dataclass
class Build:
    rows: list[dict] = field(default_factory=list)
    sessions: int = 0
    sessions_skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    rows_by_agent: Counter = field(default_factory=Counter)
    invalid_expert: Counter = field(default_factory=Counter)
    qa_pairs: int = 0
    sessions_without_qa: int = 0


def state_path_value(path: Path, base: Path | None) -> str:
    """The state folder as the reward server will be told it: absolute, or relative to `base` (its --state-root)."""
    path = path.resolve()
    if base is None:
        return str(path)
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        raise tj.TrajectoryError(f"state folder {path} is not under --state-path-base {base}") from None


def build_rows(dialogues: list[tj.Dialogue], qa: dict[str, dict[int, dict]], *, require_qa: bool,
               data_source: str = DATA_SOURCE, state_path_base: Path | None = None,
               shuffle_seed: int | None = None) -> Build:
    """The rows of every finished session, four per session, adjacent and in agent order; `qa[path][session]` is a
    QA cache record. With `shuffle_seed` the sessions (never the rows within one) are put in a seeded random order:
    the trainer reads the file in order (data.shuffle=False) so that a batch holds whole sessions."""
    b = Build()
    groups: list[list[dict]] = []
    for d in dialogues:
        by_session = d.calls_by_session()
        sessions = d.sessions()
        for i in range(d.finished_sessions):
            calls = by_session.get(i) or {}
            pairs = qa_pairs_of(qa.get(str(d.path), {}).get(i))
            gid = session_group_id(d.dataset, d.sample_id, i)
            try:
                if set(calls) != set(AGENTS):
                    raise Skip("missing agent calls")
                if require_qa and not pairs:
                    raise Skip("no synthetic QA", str((qa.get(str(d.path), {}).get(i) or {}).get("error") or "")[:160])
                prompts_ = {a: clean_prompt(calls[a].get("messages")) for a in AGENTS}
            except Skip as exc:
                b.sessions_skipped[exc.kind] += 1
                b.skipped_examples.setdefault(exc.kind, f"{gid}: {exc}")
                continue
            outs, valid = expert_outputs_of(calls)
            meta = sessions[i] if i < len(sessions) else {}
            b.sessions += 1
            b.qa_pairs += len(pairs)
            b.sessions_without_qa += not pairs
            group: list[dict] = []
            groups.append(group)
            for agent in AGENTS:
                group.append({
                    "data_source": data_source,
                    "prompt": prompts_[agent],
                    "ability": ABILITY,
                    "reward_model": {"style": "rule", "ground_truth": outs[agent]},
                    "extra_info": {
                        "index": -1,  # set below, once the order is known
                        "sample_id": d.sample_id,
                        "dataset": d.dataset,
                        "session_index": i,
                        "session_id": str(meta.get("id") or calls[agent].get("session_id") or ""),
                        "session_time": meta.get("time") or calls[agent].get("session_time"),
                        "session_group_id": gid,
                        "agent": agent,
                        "state_path": state_path_value(d.state_path(i), state_path_base),
                        "qa_pairs": pairs,
                        "expert_outputs": outs,
                        "expert_valid": valid[agent],
                    },
                })
                b.rows_by_agent[agent] += 1
                b.invalid_expert[agent] += not valid[agent]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(groups)
    b.rows = [row for group in groups for row in group]
    for k, row in enumerate(b.rows):
        row["extra_info"]["index"] = k
    return b


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=rl_schema())
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def cached_qa(dialogue: tj.Dialogue, n: int) -> dict[int, dict]:
    """The latest usable cached record of each session with n questions, whatever model wrote it."""
    from training.session_qa import read_qa_cache

    out: dict[int, dict] = {}
    for rec in read_qa_cache(dialogue.path).values():
        if int(rec.get("n_questions", 0)) == n:
            i = int(rec["session_index"])
            if i not in out or str(rec.get("created_at", "")) >= str(out[i].get("created_at", "")):
                out[i] = rec
    return out


async def generate_qa(dialogues: list[tj.Dialogue], args) -> dict[str, dict[int, dict]]:
    from tqdm import tqdm

    from qa_generator import qa_client
    from training.session_qa import fill_qa_cache

    client = qa_client(args.provider, args.model, args.base_url, args.api_key, args.workers,
                       timeout_s=args.request_timeout, max_tokens=args.max_tokens_qa)
    sem = asyncio.Semaphore(args.workers)
    total = sum(d.finished_sessions for d in dialogues)
    out: dict[str, dict[int, dict]] = {}
    try:
        with tqdm(total=total, desc="session QA", unit="session", disable=True if args.no_progress else None) as bar:
            results = await asyncio.gather(*(fill_qa_cache(client, d, args.qa_per_session, semaphore=sem,
                                                           on_done=lambda i, rec: bar.update(1)) for d in dialogues))
    finally:
        await client.aclose()
    for d, res in zip(dialogues, results):
        out[str(d.path)] = res
    return out


def build_parser() -> tj.OneLineParser:
    p = tj.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectories-dir", "--trajectory-dir", dest="trajectories_dir", default="expert_trajectories",
                   help="a dialogue folder, a dataset folder or the trajectories root (default expert_trajectories)")
    p.add_argument("--output-file", required=True, help="the parquet file to write")
    p.add_argument("--seed", type=int, default=42, help="seed of the session order (default 42)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep sessions in dialogue order (default: seeded random order, a session's rows adjacent)")
    p.add_argument("--add-qa", action="store_true", help="generate the synthetic session QA that is not cached yet")
    p.add_argument("--qa-per-session", type=int, default=config.QA_PER_SESSION)
    p.add_argument("--provider", default="openai", choices=AVAILABLE_PROVIDERS, help="QA generation provider")
    p.add_argument("--model", "--qa-model", dest="model", default=config.QA_GENERATION_MODEL, help="QA generation model")
    p.add_argument("--base-url")
    p.add_argument("--api-key")
    p.add_argument("--workers", type=int, default=8, help="QA requests in flight")
    p.add_argument("--data-source", default=DATA_SOURCE, help=f"the data_source column (default {DATA_SOURCE})")
    p.add_argument("--state-path-base", help="write state paths relative to this folder (the reward server's "
                                             "state root) instead of absolute")
    p.add_argument("--request-timeout", type=float, default=config.DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds one QA-generation attempt may take, to the whole reply")
    p.add_argument("--max-tokens-qa", type=int, default=config.MAX_TOKENS_QA, help="reply cap of QA generation")
    p.add_argument("--allow-test-split", action="store_true",
                   help="allow dialogues of held-out LongMemEval test instances (refused by default)")
    p.add_argument("--allow-empty-qa", action="store_true",
                   help="exit 0 even when most rows have no synthetic QA (such rows can only score 0)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return tj.cli_exit(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from memory_store import StoreError, check_output_file

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.qa_per_session < 1:
            raise tj.TrajectoryError("--qa-per-session must be at least 1")
        if args.workers < 1:
            raise tj.TrajectoryError("--workers must be at least 1")
        if Path(args.output_file).suffix != ".parquet":
            raise tj.TrajectoryError(f"--output-file must end in .parquet, not {args.output_file!r}")
        check_output_file(args.output_file, "--output-file")
        from scripts.convert_trajectories_to_sft import load_dialogues

        dialogues, unfinished = load_dialogues(args.trajectories_dir)
        tj.refuse_test_split(((d.dataset, d.sample_id) for d in dialogues), args.allow_test_split, "dialogue")
        if not dialogues:
            raise tj.TrajectoryError(f"no finished dialogue under {args.trajectories_dir} ({len(unfinished)} unfinished)")
        if args.add_qa:
            try:
                qa = asyncio.run(generate_qa(dialogues, args))
            except ValueError as exc:  # a dialogue whose recorded calls lack the session text
                raise tj.TrajectoryError(f"QA generation: {exc}") from None
        else:
            qa = {str(d.path): cached_qa(d, args.qa_per_session) for d in dialogues}
        b = build_rows(dialogues, qa, require_qa=args.add_qa, data_source=args.data_source,
                       state_path_base=Path(args.state_path_base) if args.state_path_base else None,
                       shuffle_seed=None if args.no_shuffle else args.seed)
        if not b.rows:
            raise tj.TrajectoryError(f"no rows: every session was skipped ({dict(b.sessions_skipped)})")
        write_parquet(b.rows, Path(args.output_file))
    except (tj.TrajectoryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"RL data -> {args.output_file}")
    print(f"  dialogues: {len(dialogues)} used, {len(unfinished)} unfinished skipped")
    print(f"  sessions: {b.sessions} kept, {sum(b.sessions_skipped.values())} skipped   rows: {len(b.rows)} "
          f"({', '.join(f'{a} {b.rows_by_agent[a]}' for a in AGENTS)})")
    print(f"  synthetic QA: {b.qa_pairs} questions ({b.qa_pairs / max(1, b.sessions):.2f} per session), "
          f"{b.sessions_without_qa} session(s) without QA" + ("" if args.add_qa else " (cached only; --add-qa generates)"))
    bad = {a: n for a, n in b.invalid_expert.items() if n}
    if bad:
        print(f"  rows whose expert output failed or does not parse (expert_valid false): {bad}")
    for kind, n in b.sessions_skipped.most_common():
        print(f"  skipped {n} session(s): {kind}   e.g. {b.skipped_examples[kind][:160]}")
    for line in unfinished:
        print(f"  skipped dialogue {line}")
    zero_only = sum(1 for r in b.rows if not r["extra_info"]["qa_pairs"])
    print(f"  rows that can only score 0 (no synthetic QA: a reward over zero questions): {zero_only} of {len(b.rows)}")
    print(f"  time: {time.perf_counter() - t0:.1f}s")
    if zero_only * 2 > len(b.rows) and not args.allow_empty_qa:
        print(f"error: most rows ({zero_only} of {len(b.rows)}) have no synthetic QA, so their reward is 0 whatever "
              "the policy does: run with --add-qa (or pass --allow-empty-qa to keep this file)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
