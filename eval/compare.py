"""Compare two runs question by question: `python -m eval.compare RUN_A RUN_B [--out DIR]`.

Only questions that both runs judged (CORRECT or WRONG, no failure) are compared, so each question counts once on
each side. For them: each run's accuracy with its 95 % interval, the difference B - A in percentage points with a
paired bootstrap interval, and the exact McNemar p-value; the same per category (LoCoMo) or question type; and the
questions whose verdict flipped. Writes ``compare.json`` and ``compare.html`` (the run viewer for the pair) into
``--out`` (default: ``compare-<A>-vs-<B>`` beside RUN_A).

Two runs on different datasets, or judged under different protocols, are not comparable: exit 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval import report_html, stats
from eval.report_html import _e, _fmt_ci, _fmt_pct
from memory_store import atomic_write_text

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"
ADVERSARIAL = "5 adversarial"


class CompareError(Exception):
    """Runs that cannot be compared, or are not there: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m eval.compare",
                description="Paired comparison of two runs over the questions both judged: accuracies, the "
                            "difference with a paired bootstrap 95% interval, exact McNemar p-value, per category, "
                            "flipped questions; writes compare.json and compare.html.")
    p.add_argument("run_a", metavar="RUN_A", help="run folder of the reference run (summary.json, answers.jsonl, "
                                                  "judgments.jsonl)")
    p.add_argument("run_b", metavar="RUN_B", help="run folder of the run compared with it")
    p.add_argument("--out", help="folder for compare.json and compare.html (default: compare-<A>-vs-<B> beside RUN_A)")
    p.add_argument("--max-flipped", type=int, default=20, help="flipped questions printed (all are in the files; "
                                                               "default 20)")
    return p


# --------------------------------------------------------------------------- checks

def _protocols(run: Mapping[str, Any]) -> set[str]:
    found = {str(q["jp"]) for q in run["questions"] if q.get("jp")}
    recorded = run["summary"].get("judge_protocol")
    return found | ({str(recorded)} if recorded else set())


def check_comparable(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    for run in (a, b):
        if not run["summary"]:
            raise CompareError(f"{run['path']}: no summary.json (is it a run folder of eval.runner?)")
        if not run["questions"]:
            raise CompareError(f"{run['path']}: no answered questions (answers.jsonl is missing or empty)")
    da, db = a["summary"].get("dataset"), b["summary"].get("dataset")
    if da != db:
        raise CompareError(f"the runs are on different datasets ({da} vs {db}): not comparable")
    for tag, run in (("A", a), ("B", b)):
        if len(_protocols(run)) > 1:
            raise CompareError(f"run {tag} mixes judge protocols ({', '.join(sorted(_protocols(run)))}): rejudge it "
                               f"under one protocol first")
    pa, pb = _protocols(a), _protocols(b)
    if pa != pb:
        raise CompareError(f"the runs were judged under different protocols ({', '.join(sorted(pa)) or 'none'} vs "
                           f"{', '.join(sorted(pb)) or 'none'}): not comparable")


# --------------------------------------------------------------------------- the comparison

def _judged(q: Mapping[str, Any]) -> bool:
    return q["v"] in ("CORRECT", "WRONG")


def _key(q: Mapping[str, Any]) -> tuple[str, str]:
    return q["s"], q["id"]


def pair_questions(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[tuple[dict, dict]], dict[str, int]]:
    """Questions both runs judged, in A's order, and the counts of those that are not shared."""
    qa = {_key(q): q for q in a["questions"]}
    qb = {_key(q): q for q in b["questions"]}
    pairs = [(q, qb[k]) for k, q in qa.items() if k in qb and _judged(q) and _judged(qb[k])]
    mismatched = [q["id"] for q, r in pairs if (q.get("q") or "") != (r.get("q") or "")]
    if mismatched:
        raise CompareError(f"{len(mismatched)} shared question ids have different question text (e.g. "
                           f"{mismatched[0]}): the runs read different dataset files")
    keys = set(qa) | set(qb)
    judged_a = {k for k, q in qa.items() if _judged(q)}
    judged_b = {k for k, q in qb.items() if _judged(q)}
    counts = {
        "shared": len(pairs),
        "judged_only_in_a": len(judged_a - judged_b),
        "judged_only_in_b": len(judged_b - judged_a),
        "judged_in_neither": len(keys - judged_a - judged_b),
        "questions_in_a": len(qa), "questions_in_b": len(qb),
    }
    counts["not_shared"] = len(keys) - counts["shared"]
    return pairs, counts


def compare_group(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    """Accuracies, paired difference B - A with its interval, McNemar, over one group of shared questions."""
    a = [int(x["v"] == "CORRECT") for x, _ in pairs]
    b = [int(y["v"] == "CORRECT") for _, y in pairs]
    clusters = [x["s"] for x, _ in pairs]
    n = len(pairs)
    ci_a, method = stats.accuracy_interval(a, clusters)
    ci_b, _ = stats.accuracy_interval(b, clusters)
    diff_ci, diff_method = stats.paired_difference_interval(b, a, clusters)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    gained = sum(1 for x, y in zip(a, b) if y and not x)
    return {
        "n": n,
        "accuracy_a": round(100.0 * sum(a) / n, 2) if n else None,
        "accuracy_b": round(100.0 * sum(b) / n, 2) if n else None,
        "accuracy_a_ci95": stats.as_percent(ci_a), "accuracy_b_ci95": stats.as_percent(ci_b), "ci_method": method,
        "difference": round(100.0 * (sum(b) - sum(a)) / n, 2) if n else None,
        "difference_ci95": stats.as_percent(diff_ci), "difference_method": diff_method,
        "b_right_a_wrong": gained, "a_right_b_wrong": lost,
        "both_right": sum(1 for x, y in zip(a, b) if x and y), "both_wrong": sum(1 for x, y in zip(a, b) if not x and not y),
        "mcnemar_p": stats.mcnemar_exact(lost, gained) if n else None,
    }


def compare_runs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    check_comparable(a, b)
    pairs, counts = pair_questions(a, b)
    groups: dict[str, list] = {}
    for pair in pairs:
        groups.setdefault(pair[0]["c"], []).append(pair)
    by = "category" if any(c[:1].isdigit() for c in groups) else "type"
    result: dict[str, Any] = {
        "dataset": a["summary"].get("dataset"),
        "judge_protocol": sorted(_protocols(a))[0] if _protocols(a) else None,
        "run_a": {"name": a["name"], "path": a["path"], "models": a["summary"].get("models"),
                  "settings": a["summary"].get("settings"), "baseline": a["summary"].get("baseline")},
        "run_b": {"name": b["name"], "path": b["path"], "models": b["summary"].get("models"),
                  "settings": b["summary"].get("settings"), "baseline": b["summary"].get("baseline")},
        "difference": "B - A, percentage points",
        "questions": counts,
        "overall": compare_group(pairs),
        "groups_by": by,
        "by_group": {k: compare_group(v) for k, v in sorted(groups.items(), key=lambda kv: _order(kv[0]))},
        "methods": {**stats.METHODS, **stats.PAIRED_METHODS,
                    "mcnemar": "exact two-sided McNemar test (binomial on the discordant pairs)"},
    }
    if by == "category" and ADVERSARIAL in groups:
        result["without_adversarial"] = compare_group([p for p in pairs if p[0]["c"] != ADVERSARIAL])
    result["flipped"] = [
        {"sample_id": x["s"], "question_id": x["id"], "category": x["c"], "question": x["q"], "gold": x["g"],
         "a": x["v"], "b": y["v"], "answer_a": x["a"], "answer_b": y["a"],
         "direction": "gained" if y["v"] == "CORRECT" else "lost"}
        for x, y in pairs if x["v"] != y["v"]
    ]
    return result


def _order(key: str) -> tuple:
    head = key.split(" ", 1)[0]
    return (0, int(head), key) if head.isdigit() else (1, 0, key)


# --------------------------------------------------------------------------- output

_SHORT = {stats.WILSON: "Wilson", stats.CLUSTER_BOOTSTRAP: "bootstrap over samples",
          stats.PAIRED_BOOTSTRAP: "paired bootstrap over questions",
          stats.PAIRED_CLUSTER_BOOTSTRAP: "paired bootstrap over samples"}


def _fmt_p(p: Any) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _fmt_diff(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _fmt_diff_ci(ci: Any) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "n/a"


def _row(name: str, g: Mapping[str, Any]) -> list[str]:
    return [name, str(g["n"]), _fmt_pct(g["accuracy_a"]), _fmt_pct(g["accuracy_b"]), _fmt_diff(g["difference"]),
            _fmt_diff_ci(g.get("difference_ci95")), str(g["b_right_a_wrong"]), str(g["a_right_b_wrong"]),
            _fmt_p(g["mcnemar_p"])]


def render_text(result: Mapping[str, Any], *, max_flipped: int = 20) -> str:
    c = result["questions"]
    lines = [f"A: {result['run_a']['path']}", f"B: {result['run_b']['path']}",
             f"dataset {result['dataset']}, judge protocol {result['judge_protocol']}; difference = B - A "
             f"(percentage points)",
             f"shared questions (judged in both): {c['shared']}; not shared: {c['not_shared']} "
             f"({c['judged_only_in_a']} judged only in A, {c['judged_only_in_b']} only in B, "
             f"{c['judged_in_neither']} in neither)"]
    judges = [(r.get("models") or {}).get("judge") if isinstance(r.get("models"), Mapping) else None
              for r in (result["run_a"], result["run_b"])]
    if judges[0] != judges[1]:
        lines.append(f"note: different judge models ({judges[0]} vs {judges[1]}): a difference may be the judge's")
    if result["run_a"].get("baseline") or result["run_b"].get("baseline"):
        lines.append("OFFLINE BASELINE in at least one run: not an LLM result")
    header = [result["groups_by"], "n", "A", "B", "B-A", "95% CI", "only B", "only A", "McNemar p"]
    rows = [_row("overall", result["overall"])]
    if result.get("without_adversarial"):
        rows.append(_row("w/o adversarial", result["without_adversarial"]))
    rows += [_row(k, g) for k, g in result["by_group"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines += ["", fmt(header), *(fmt(r) for r in rows)]
    o = result["overall"]
    lines += ["", f"only B / only A: questions only that run got right. B-A interval: {_SHORT[o['difference_method']]}; "
                  f"accuracies: {_SHORT[o['ci_method']]}; McNemar: exact, two-sided."]
    flipped = result["flipped"]
    lines.append(f"flipped: {len(flipped)} ({o['b_right_a_wrong']} gained, {o['a_right_b_wrong']} lost)")
    for f in flipped[:max_flipped]:
        lines.append(f"  {'+' if f['direction'] == 'gained' else '-'} {f['question_id']} [{f['category']}] "
                     f"{(f['question'] or '')[:70]}")
    if len(flipped) > max_flipped:
        lines.append(f"  … {len(flipped) - max_flipped} more in compare.json")
    return "\n".join(lines)


def _compare_head(result: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    c, o = result["questions"], result["overall"]
    banners = "".join(dict.fromkeys(report_html._banner(r["summary"]) for r in (a, b)))  # one when they agree
    settings = []
    for tag, run in (("A", a), ("B", b)):
        s = run["summary"]
        models = s.get("models") if isinstance(s.get("models"), Mapping) else {}
        top_k = (s.get("settings") or {}).get("top_k") if isinstance(s.get("settings"), Mapping) else None
        settings.append(f"<dt>{tag}</dt><dd>{_e(run['name'])} · builder {_e(models.get('builder'))} · answer "
                        f"{_e(models.get('answer'))} · judge {_e(models.get('judge'))} · top-k {_e(top_k)} · "
                        f"accuracy over its own judged questions {_e(_fmt_pct(s.get('accuracy')))}</dd>")
    summary = (f"<section id='summary'><h2>Pair</h2><dl class='facts'>{''.join(settings)}"
               f"<dt>dataset</dt><dd>{_e(result['dataset'])}, judge protocol {_e(result['judge_protocol'])}</dd>"
               f"<dt>shared</dt><dd id='shared'>{c['shared']} questions judged in both; not shared "
               f"{c['not_shared']} ({c['judged_only_in_a']} judged only in A, {c['judged_only_in_b']} only in B, "
               f"{c['judged_in_neither']} in neither)</dd>"
               f"<dt>accuracy A</dt><dd>{_e(_fmt_pct(o['accuracy_a']))} {_e(_fmt_ci(o['accuracy_a_ci95']))}</dd>"
               f"<dt>accuracy B</dt><dd>{_e(_fmt_pct(o['accuracy_b']))} {_e(_fmt_ci(o['accuracy_b_ci95']))}</dd>"
               f"<dt>B − A</dt><dd id='difference'>{_e(_fmt_diff(o['difference']))} points, 95% interval "
               f"{_e(_fmt_diff_ci(o['difference_ci95']))} ({_e(stats.PAIRED_METHODS.get(o['difference_method']))})</dd>"
               f"<dt>McNemar</dt><dd id='mcnemar'>p = {_e(_fmt_p(o['mcnemar_p']))} (exact, two-sided; "
               f"{o['b_right_a_wrong']} only B right, {o['a_right_b_wrong']} only A right)</dd></dl></section>")
    rows = [("overall", o)]
    if result.get("without_adversarial"):
        rows.append(("overall w/o adversarial", result["without_adversarial"]))
    rows = list(result["by_group"].items()) + rows
    chart = []
    for name, g in rows:
        chart.append(
            f"<div class='bar-row pair'><span class='bar-name'>{_e(name)} <span class='muted'>n={g['n']}</span></span>"
            f"<div>{report_html._bar(g['accuracy_a'], g['accuracy_a_ci95'], 'a', 'track half')}"
            f"{report_html._bar(g['accuracy_b'], g['accuracy_b_ci95'], 'b', 'track half')}</div>"
            f"<span class='bar-value'>A {_e(_fmt_pct(g['accuracy_a']))} · B {_e(_fmt_pct(g['accuracy_b']))} · "
            f"{_e(_fmt_diff(g['difference']))} {_e(_fmt_diff_ci(g['difference_ci95']))} · p {_e(_fmt_p(g['mcnemar_p']))}"
            f"</span></div>")
    chart_html = (f"<section id='chart'><h2>Accuracy by {_e(result['groups_by'])} on shared questions</h2>"
                  f"<p class='legend meta'><span class='la'></span>A<span class='lb'></span>B · "
                  f"whiskers: 95% intervals; B − A with its paired interval and McNemar p</p>{''.join(chart)}</section>")
    return f"{banners}<div class='top'>{summary}{chart_html}</div>"


def render_compare_html(result: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """The viewer for the pair: only shared questions, A's and B's verdicts side by side."""
    pairs, _ = pair_questions(a, b)
    runs = [{**a, "questions": [x for x, _ in pairs]}, {**b, "questions": [y for _, y in pairs]}]
    title = f"MemBuilder comparison: {a['name']} (A) vs {b['name']} (B) · {result['dataset']}"
    return report_html.render_page(title=title, head_html=_compare_head(result, a, b), kind="pair", runs=runs)


def _default_out(run_a: Path, run_b: Path) -> Path:
    return run_a.resolve().parent / f"compare-{run_a.resolve().name}-vs-{run_b.resolve().name}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_flipped < 0:
            raise CompareError("--max-flipped must be at least 0")
        paths = [Path(args.run_a), Path(args.run_b)]
        for p in paths:
            if not p.is_dir():
                raise CompareError(f"{p}: no such run folder")
        a, b = (report_html.load_run(p) for p in paths)
        result = compare_runs(a, b)
        out = Path(args.out) if args.out else _default_out(*paths)
        if out.exists() and not out.is_dir():
            raise CompareError(f"--out {out}: exists and is not a folder")
        html_text = render_compare_html(result, a, b)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(out / COMPARE_JSON, json.dumps(result, indent=2, ensure_ascii=False))
    atomic_write_text(out / COMPARE_HTML, html_text)
    print(render_text(result, max_flipped=args.max_flipped))
    print(f"-> {out / COMPARE_JSON}, {out / COMPARE_HTML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
