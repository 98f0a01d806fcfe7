"""Scores, breakdowns and the human report of an evaluation run.

Two families of numbers live here, and every number says which one it is:

* Judge accuracy: the share of questions an LLM (or, offline, a lexical) judge labelled CORRECT.
  The labels come from ``eval/llm_judge.py``; this module only counts them (``summarize``).
* LoCoMo lexical metrics (``LEXICAL_PROTOCOL``): token F1 and BLEU-1 on normalised, Porter-stemmed
  tokens, with LoCoMo's per-category rules (``locomo_f1``). They need no judge and are computed from
  each record's ``prediction`` and ``gold``.

Decisions (kept in one place so the report can cite them):

* ``normalize_answer`` drops commas, lowercases, strips ASCII punctuation, drops the words
  a/an/the/and, collapses whitespace and Porter-stems every token (nltk's ``PorterStemmer`` in its
  default mode, the one LoCoMo's own script uses). Non-string answers (LoCoMo has a few integers)
  are converted with ``str``; ``None`` is the empty string.
* Empty inputs: F1 and BLEU-1 are 0.0 when the prediction or the gold is empty after normalisation,
  both empty included, as in LoCoMo's script (its F1 is 0 without a shared token; nltk's BLEU is 0 for an
  empty hypothesis). No real LoCoMo gold is empty after normalisation.
* Category 1 (multi-hop): gold and prediction are split on commas *before* normalisation (which
  drops commas); each gold part takes its best F1 over the prediction parts; the parts are averaged.
  As in LoCoMo's script, a part that is empty (a stray comma) is kept and scores 0.
* Category 3 (open-domain): LoCoMo's gold often reads "answer; rationale". As in LoCoMo's official
  evaluation script, only the part before the first ';' is scored.
* Category 5 (adversarial), our rule: the gold is "Not answerable" (the dataset gives only a misleading
  ``adversarial_answer``), so the score is 1.0 when the prediction expresses unavailability
  (``expresses_unavailability``: a fixed list of phrases, ``UNAVAILABILITY_PHRASES``) and 0.0
  otherwise, whatever the gold text. Two items of conv-26 also carry the dataset's own answer "No"
  (a record's ``also_correct``): the conversation shows the premise is false, so a prediction that
  answers "No" (its first word) scores 1.0 as well. BLEU-1 has no category rule in LoCoMo; for
  category 5 it is the same 0/1 score, so that BLEU-1 never rewards repeating a misleading answer.
* Category 5, LoCoMo's own rule (``locomo_script_f1``, reported beside ours under
  ``lexical.locomo_script``): 1 only when the lowercased prediction contains "no information
  available" or "not mentioned"; the dataset's "No" is not accepted. Categories 1-4 are scored
  the same way under both labels.
* Lexical figures are percentages (0-100, 2 decimals) like the accuracies, computed over the
  questions that have a prediction (a question whose answer call failed has none and is counted
  in ``n_missing``).
* Accuracy: ``accuracy`` = CORRECT / judged questions; ``accuracy_all`` = CORRECT / all questions
  (a failed question counts as wrong). A question is judged when it is not ``failed`` and its label
  is CORRECT or WRONG.
* Uncertainty: every accuracy comes with a 95 % interval (``accuracy_ci95``, ``accuracy_all_ci95``, in percent)
  and its method (``ci_method``, ``ci_method_all``: a key of ``eval.stats.METHODS``, described in the summary's
  ``intervals``): a bootstrap over samples when the group's questions come several to a sample from several
  samples (they share a memory, so they are not independent), the Wilson interval otherwise.
"""

from __future__ import annotations

import functools
import math
import os
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

LEXICAL_PROTOCOL = "LoCoMo lexical F1 / BLEU-1 (normalised, Porter-stemmed)"
CATEGORY_5_RULE = (
    "ours: 1 when the answer expresses unavailability (any of 31 phrases, metrics.UNAVAILABILITY_PHRASES) or, for the "
    "two conv-26 items whose dataset answer is 'No', answers 'No'; else 0"
)
LOCOMO_SCRIPT_PROTOCOL = (
    "LoCoMo's own QA scoring script (snap-research/locomo task_eval/evaluation.py): F1 as ours for categories 1-4; "
    "category 5 scores 1 only when the answer contains 'no information available' or 'not mentioned'"
)
LOCOMO_SCRIPT_PHRASES: tuple[str, ...] = ("no information available", "not mentioned")

from eval.datasets import LOCOMO_CATEGORY_NAMES  # noqa: E402 - one table of category names
from eval import stats  # noqa: E402
ADVERSARIAL_CATEGORY = 5

# Lowercase phrases, matched as substrings after apostrophes are unified and whitespace collapsed.
# Kept specific on purpose: a bare "unknown" or "no" would credit real (wrong) answers.
UNAVAILABILITY_PHRASES: tuple[str, ...] = (
    "not answerable",
    "unanswerable",
    "cannot be answered",
    "can not be answered",
    "can't be answered",
    "cannot answer",
    "can't answer",
    "unable to answer",
    "no information",
    "not enough information",
    "insufficient information",
    "information is not available",
    "information not available",
    "not mentioned",
    "n't mentioned",
    "never mentioned",
    "not specified",
    "n't specified",
    "not stated",
    "n't stated",
    "not provided",
    "does not mention",
    "doesn't mention",
    "no mention",
    "no record",
    "no memory of",
    "not in memory",
    "not in the memory",
    "there is no indication",
    "i don't know",
    "i do not know",
)

BASELINE_NOTE = (
    "OFFLINE BASELINE: rule-based builder, extractive answerer, lexical judge — not an LLM result"
)

_ARTICLES_RE = re.compile(r"\b(a|an|the|and)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


# ----------------------------------------------------------------------------- normalisation


@functools.lru_cache(maxsize=1)
def _stemmer():
    # nltk is slow to import; only the lexical metrics need it.
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def normalize_answer(s: Any) -> str:
    """LoCoMo normalisation: commas, case, punctuation, a/an/the/and removed; tokens Porter-stemmed."""
    text = _as_text(s).replace(",", "").lower()
    text = text.translate(_PUNCT_TABLE)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(_stem(tok) for tok in text.split())


def _tokens(s: Any) -> list[str]:
    return normalize_answer(s).split()


# ----------------------------------------------------------------------------- lexical scores


def _f1_tokens(pred: Sequence[str], gold: Sequence[str]) -> float:
    if not pred or not gold:  # LoCoMo's script: no shared token, F1 0, even when both are empty
        return 0.0
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: Any, gold: Any) -> float:
    """Multiset token F1 between the normalised prediction and gold, in [0, 1]."""
    return _f1_tokens(_tokens(prediction), _tokens(gold))


def multi_hop_f1(prediction: Any, gold: Any) -> float:
    """LoCoMo category 1: mean over comma-separated gold parts of the best F1 against any prediction part."""
    pred_tokens = [_tokens(p.strip()) for p in _as_text(prediction).split(",")]
    scores = [max(_f1_tokens(pt, _tokens(g.strip())) for pt in pred_tokens) for g in _as_text(gold).split(",")]
    return sum(scores) / len(scores)


def expresses_unavailability(prediction: Any) -> bool:
    """True when the prediction says the answer is not available (see UNAVAILABILITY_PHRASES)."""
    text = " ".join(_as_text(prediction).translate(_APOSTROPHES).lower().split())
    return any(phrase in text for phrase in UNAVAILABILITY_PHRASES)


def _category_gold(gold: Any, category: int | None) -> Any:
    if category == 3:
        return _as_text(gold).split(";")[0].strip()
    return gold


def gives_polar_answer(prediction: Any, expected: Any) -> bool:
    """True when ``expected`` is yes/no and the prediction's first word is that word ("No, Melanie made it")."""
    want = normalize_answer(expected)
    words = normalize_answer(prediction).split()
    return want in ("ye", "no") and bool(words) and words[0] == want  # Porter stems "yes" to "ye"


def adversarial_score(prediction: Any, also_correct: Any = None) -> float:
    """Our category-5 score: abstention, or the dataset's own yes/no answer where an item has one."""
    if expresses_unavailability(prediction):
        return 1.0
    return 1.0 if also_correct is not None and gives_polar_answer(prediction, also_correct) else 0.0


def locomo_script_adversarial(prediction: Any) -> float:
    """LoCoMo's own category-5 rule: 1 only for "no information available" or "not mentioned" in the answer."""
    text = _as_text(prediction).lower()
    return 1.0 if any(phrase in text for phrase in LOCOMO_SCRIPT_PHRASES) else 0.0


def locomo_f1(prediction: Any, gold: Any, category: int | None, also_correct: Any = None) -> float:
    """LoCoMo F1 with the per-category rules (1: comma split, 3: gold before ';', 5: our abstention rule)."""
    if category == ADVERSARIAL_CATEGORY:
        return adversarial_score(prediction, also_correct)
    if category == 1:
        return multi_hop_f1(prediction, gold)
    return token_f1(prediction, _category_gold(gold, category))


def locomo_script_f1(prediction: Any, gold: Any, category: int | None) -> float:
    """F1 as LoCoMo's own script computes it: ``locomo_f1`` with its two-phrase category-5 rule."""
    if category == ADVERSARIAL_CATEGORY:
        return locomo_script_adversarial(prediction)
    return locomo_f1(prediction, gold, category)


def bleu1(prediction: Any, gold: Any) -> float:
    """Sentence BLEU-1 on normalised tokens: clipped unigram precision times the brevity penalty."""
    pred = _tokens(prediction)
    ref = _tokens(gold)
    if not pred or not ref:  # as nltk's sentence_bleu: nothing to match, 0
        return 0.0
    clipped = sum((Counter(pred) & Counter(ref)).values())
    precision = clipped / len(pred)
    c, r = len(pred), len(ref)
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * precision


def locomo_bleu1(prediction: Any, gold: Any, category: int | None, also_correct: Any = None) -> float:
    """BLEU-1 with the same category 3 gold rule and category 5 score as ``locomo_f1``."""
    if category == ADVERSARIAL_CATEGORY:
        return adversarial_score(prediction, also_correct)
    return bleu1(prediction, _category_gold(gold, category))


# ----------------------------------------------------------------------------- aggregation


def _pct(num: float, den: int) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def _is_judged(rec: Mapping[str, Any]) -> bool:
    return not rec.get("failed") and _label(rec) in ("CORRECT", "WRONG")


def _label(rec: Mapping[str, Any]) -> str | None:
    label = rec.get("label")
    return str(label).strip().upper() if label is not None else None


def _is_correct(rec: Mapping[str, Any]) -> bool:
    return _is_judged(rec) and _label(rec) == "CORRECT"


def _category_id(rec: Mapping[str, Any]) -> int | None:
    cat = rec.get("category")
    if cat is None or cat == "":
        return None
    try:
        return int(cat)
    except (TypeError, ValueError):
        return None


def category_key(category: int | None, name: str | None = None) -> str:
    """The breakdown key of a LoCoMo category, "<id> <name>", e.g. "4 single-hop"."""
    if category is None:
        return "uncategorised"
    name = name or LOCOMO_CATEGORY_NAMES.get(category)
    return f"{category} {name}" if name else str(category)


def _group(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(records)
    judged = sum(1 for r in records if _is_judged(r))
    correct = sum(1 for r in records if _is_correct(r))
    failed = sum(1 for r in records if r.get("failed"))
    return {
        "n": n,
        "n_judged": judged,
        "n_failed": failed,
        "correct": correct,
        "accuracy": _pct(correct, judged),
        "accuracy_all": _pct(correct, n),
        **_intervals(records),
    }


def _intervals(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """95 % intervals (percent) of ``accuracy`` and ``accuracy_all``, each with its method (``stats.METHODS``)."""
    judged = [r for r in records if _is_judged(r)]
    ci, method = stats.accuracy_interval([int(_is_correct(r)) for r in judged], [r.get("sample_id") for r in judged])
    ci_all, method_all = stats.accuracy_interval([int(_is_correct(r)) for r in records],
                                                 [r.get("sample_id") for r in records])
    return {"accuracy_ci95": stats.as_percent(ci), "accuracy_all_ci95": stats.as_percent(ci_all),
            "ci_method": method, "ci_method_all": method_all}


def _grouped(records: Iterable[Mapping[str, Any]], key) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list[Mapping[str, Any]]] = {}
    for rec in records:
        out.setdefault(key(rec), []).append(rec)
    return out


def _is_locomo(dataset: str, records: Sequence[Mapping[str, Any]]) -> bool:
    return dataset.lower().startswith("locomo") or any(_category_id(r) is not None for r in records)


def _category_groups(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_id = _grouped(records, _category_id)
    ordered = sorted(by_id, key=lambda c: (c is None, c if c is not None else 0))
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for cat in ordered:
        recs = by_id[cat]
        name = next((r.get("category_name") for r in recs if r.get("category_name")), None)
        groups[category_key(cat, name)] = recs
    return groups


def _lexical_scores(rec: Mapping[str, Any]) -> tuple[float, float, float]:
    """(our F1, our BLEU-1, F1 under LoCoMo's own script rules) of one answered record."""
    cat = _category_id(rec)
    pred, gold, also = rec.get("prediction"), rec.get("gold"), rec.get("also_correct")
    return locomo_f1(pred, gold, cat, also), locomo_bleu1(pred, gold, cat, also), locomo_script_f1(pred, gold, cat)


def _lexical_group(scored: Sequence[tuple[Mapping[str, Any], float, float, float]]) -> dict[str, Any]:
    n = len(scored)
    return {
        "n": n,
        "f1": _pct(sum(s[1] for s in scored), n),
        "bleu1": _pct(sum(s[2] for s in scored), n),
    }


def _script_group(scored: Sequence[tuple[Mapping[str, Any], float, float, float]]) -> dict[str, Any]:
    return {"n": len(scored), "f1": _pct(sum(s[3] for s in scored), len(scored))}


def _lexical(records: Sequence[Mapping[str, Any]], locomo: bool) -> dict[str, Any]:
    answered = [r for r in records if isinstance(r.get("prediction"), str)]
    scored = [(r, *_lexical_scores(r)) for r in answered]
    overall = _lexical_group(scored)
    out: dict[str, Any] = {
        "protocol": LEXICAL_PROTOCOL,
        "unit": "percent",
        "n": overall["n"],
        "n_missing": len(records) - len(answered),
        "f1": overall["f1"],
        "bleu1": overall["bleu1"],
    }
    if locomo:
        non_adv = [s for s in scored if _category_id(s[0]) != ADVERSARIAL_CATEGORY]
        out["without_adversarial"] = _lexical_group(non_adv)
        by_cat = _category_groups([s[0] for s in scored])
        index = {id(s[0]): s for s in scored}
        cat_scored = {key: [index[id(r)] for r in recs] for key, recs in by_cat.items()}
        out["by_category"] = {key: _lexical_group(v) for key, v in cat_scored.items()}
        out["category_5_rule"] = CATEGORY_5_RULE
        out["locomo_script"] = {
            "protocol": LOCOMO_SCRIPT_PROTOCOL,
            "unit": "percent",
            **_script_group(scored),
            "without_adversarial": _script_group(non_adv),
            "by_category": {key: _script_group(v) for key, v in cat_scored.items()},
        }
    by_type = _grouped(scored, lambda s: s[0].get("type"))
    out["by_type"] = {str(t): _lexical_group(v) for t, v in by_type.items()}
    return out


def summarize(records: Sequence[Mapping[str, Any]], *, dataset: str) -> dict[str, Any]:
    """Accuracy with breakdowns by type, category (LoCoMo) and sample, plus the lexical metrics.

    Each record carries at least ``sample_id, question_id, type, category, category_name, label,
    failed, failure_reason, prediction, gold``, and optionally ``also_correct`` (a second accepted
    answer: the dataset's own answer of a LoCoMo category-5 item, see ``adversarial_score``). Breakdown values are dicts
    ``{n, n_judged, n_failed, correct, accuracy, accuracy_all}`` with accuracies in percent, plus their 95 %
    intervals ``accuracy_ci95, accuracy_all_ci95`` ([lo, hi] percent or None) and ``ci_method, ci_method_all``.
    """
    records = list(records)
    locomo = _is_locomo(dataset, records)
    overall = _group(records)
    failure_reasons = Counter(
        str(r.get("failure_reason") or "unknown") for r in records if r.get("failed")
    )
    summary: dict[str, Any] = {
        "dataset": dataset,
        "judge_metric": "accuracy = CORRECT / judged questions (percent); "
        "accuracy_all counts failed questions as WRONG",
        "accuracy": overall["accuracy"],
        "accuracy_all": overall["accuracy_all"],
        "accuracy_ci95": overall["accuracy_ci95"],
        "accuracy_all_ci95": overall["accuracy_all_ci95"],
        "ci_method": overall["ci_method"],
        "ci_method_all": overall["ci_method_all"],
        "intervals": {"confidence": stats.CONFIDENCE, "unit": "percent", "methods": dict(stats.METHODS)},
        "n_questions": overall["n"],
        "n_judged": overall["n_judged"],
        "n_correct": overall["correct"],
        "n_failed": overall["n_failed"],
        "failure_reasons": dict(failure_reasons.most_common()),
        "by_type": {str(t): _group(v) for t, v in _grouped(records, lambda r: r.get("type")).items()},
    }
    if locomo:
        summary["by_category"] = {k: _group(v) for k, v in _category_groups(records).items()}
        summary["with_adversarial"] = overall
        summary["without_adversarial"] = _group(
            [r for r in records if _category_id(r) != ADVERSARIAL_CATEGORY]
        )
    summary["by_sample"] = {
        str(s): _group(v) for s, v in _grouped(records, lambda r: r.get("sample_id")).items()
    }
    summary["lexical"] = _lexical(records, locomo)
    return summary


# ----------------------------------------------------------------------------- report

REPORT_NAME = "report.md"
CHART_NAME = "accuracy_by_category.png"
_MAX_SAMPLE_ROWS = 20


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from memory_store import atomic_write_bytes

    atomic_write_bytes(path, data)


def _fmt_pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


_CI_LABELS = {stats.WILSON: "Wilson", stats.CLUSTER_BOOTSTRAP: "bootstrap over samples"}


def _fmt_ci(ci: Any, method: Any = None) -> str:
    if not ci:
        return "n/a"
    text = f"{ci[0]:.2f}–{ci[1]:.2f}%"
    return f"{text} ({_CI_LABELS.get(method, method)})" if method else text


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rows of a usage/timing mapping: numeric leaves kept; nested groups become "a/b" keys."""
    rows: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value and all(not isinstance(v, Mapping) for v in value.values()):
                rows[name] = dict(value)
            else:
                rows.update(_flatten(value, prefix=f"{name}/"))
        else:
            rows[name] = value
    return rows


def _usage_lines(usage: Mapping[str, Any]) -> list[str]:
    rows = _flatten(usage)
    dict_rows = {k: v for k, v in rows.items() if isinstance(v, Mapping)}
    scalar_rows = {k: v for k, v in rows.items() if not isinstance(v, Mapping)}
    lines: list[str] = []
    if dict_rows:
        columns: list[str] = []
        for v in dict_rows.values():
            columns += [c for c in v if c not in columns]
        lines += _table(
            ["task", *columns],
            ([k, *(_fmt_num(v.get(c, "")) for c in columns)] for k, v in dict_rows.items()),
        )
    if scalar_rows:
        if lines:
            lines.append("")
        lines += _table(["item", "value"], ([k, _fmt_num(v)] for k, v in scalar_rows.items()))
    return lines


def _timing_lines(timing: Mapping[str, Any]) -> list[str]:
    rows = _flatten(timing)

    def fmt(v: Any) -> str:
        if isinstance(v, Mapping):
            return _describe({k: _fmt_num(x) for k, x in v.items()})
        return f"{v:,.1f} s" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return _table(["stage", "wall time"], ([k, fmt(v)] for k, v in rows.items()))


def _chart_groups(summary: Mapping[str, Any]) -> tuple[str, dict[str, Mapping[str, Any]]]:
    if summary.get("by_category"):
        return "category", dict(summary["by_category"])
    return "type", dict(summary.get("by_type") or {})


def _breakdown_lines(
    label: str, groups: Mapping[str, Mapping[str, Any]], lexical: Mapping[str, Any] | None = None
) -> list[str]:
    lexical = lexical or {}
    header = [label, "n", "judged", "correct", "failed", "accuracy", "95% interval", "accuracy (failed = wrong)"]
    if lexical:
        header += ["lexical F1", "BLEU-1"]
    rows = []
    for key, g in groups.items():
        row = [key, g.get("n", 0), g.get("n_judged", ""), g.get("correct", 0), g.get("n_failed", 0),
               _fmt_pct(g.get("accuracy")), _fmt_ci(g.get("accuracy_ci95"), g.get("ci_method")),
               _fmt_pct(g.get("accuracy_all"))]
        if lexical:
            lex = lexical.get(key) or {}
            row += [_fmt_pct(lex.get("f1")), _fmt_pct(lex.get("bleu1"))]
        rows.append(row)
    return _table(header, rows)


def render_report(summary: Mapping[str, Any], *, title: str, chart_name: str | None = CHART_NAME) -> str:
    """The markdown text of ``report.md`` (pure; ``write_report`` writes it)."""
    lines: list[str] = [f"# {title}", ""]
    baseline = summary.get("baseline")
    if baseline:
        note = baseline if isinstance(baseline, str) else BASELINE_NOTE
        lines += [f"> **{note}**", ""]

    lines.append(f"- **Dataset:** {summary.get('dataset', 'unknown')}")
    if summary.get("models"):
        lines.append(f"- **Models:** {_describe(summary['models'])}")
    prov = summary.get("provenance") or {}
    if prov.get("sessions_total"):
        lines.append(f"- **Memory:** built by {', '.join(prov.get('builder') or []) or 'unknown'}, "
                     f"{prov.get('sessions_built')} of {prov.get('sessions_total')} sessions "
                     f"({len(prov.get('partial') or [])} partial, {len(prov.get('empty') or [])} empty, "
                     f"{len(prov.get('stopped') or [])} stopped samples)")
    for warning in summary.get("warnings") or []:
        lines.append(f"- **Warning:** {warning}")
    judge = summary.get("judge") or summary.get("judge_protocol")
    lines.append(f"- **Judge:** {_describe(judge) if judge else 'not recorded in the summary'}")
    lines.append(
        f"- **Accuracy:** {_fmt_pct(summary.get('accuracy'))} "
        f"({summary.get('n_correct', 0)} / {summary.get('n_judged', summary.get('n_questions', 0))} judged); "
        f"{_fmt_pct(summary.get('accuracy_all'))} counting failed questions as wrong"
    )
    if summary.get("accuracy_ci95"):
        lines.append(
            f"- **95% interval:** {_fmt_ci(summary['accuracy_ci95'], summary.get('ci_method'))}; counting failed "
            f"questions as wrong {_fmt_ci(summary.get('accuracy_all_ci95'), summary.get('ci_method_all'))}"
        )
    if summary.get("without_adversarial") and summary.get("with_adversarial"):
        w, wo = summary["with_adversarial"], summary["without_adversarial"]
        lines.append(
            f"- **LoCoMo:** with adversarial {_fmt_pct(w.get('accuracy'))} (n={w.get('n')}"
            f"{', 95% ' + _fmt_ci(w['accuracy_ci95']) if w.get('accuracy_ci95') else ''}), "
            f"without adversarial {_fmt_pct(wo.get('accuracy'))} (n={wo.get('n')}"
            f"{', 95% ' + _fmt_ci(wo['accuracy_ci95']) if wo.get('accuracy_ci95') else ''})"
        )
    n_failed = summary.get("n_failed", 0)
    failed_line = f"- **Questions:** {summary.get('n_questions', 0)}; **failed:** {n_failed}"
    if n_failed and summary.get("failure_reasons"):
        failed_line += f" ({_describe(summary['failure_reasons'])})"
    lines.append(failed_line)
    lex = summary.get("lexical")
    if lex:
        lex_line = (
            f"- **Lexical** ({lex.get('protocol', LEXICAL_PROTOCOL)}): F1 {_fmt_pct(lex.get('f1'))}, "
            f"BLEU-1 {_fmt_pct(lex.get('bleu1'))} (n={lex.get('n')})"
        )
        wo = lex.get("without_adversarial")
        if wo:
            lex_line += (
                f"; without adversarial F1 {_fmt_pct(wo.get('f1'))}, BLEU-1 {_fmt_pct(wo.get('bleu1'))}"
            )
        script = lex.get("locomo_script")
        if script:
            lex_line += f"; F1 by LoCoMo's own script rules (category 5: two phrases) {_fmt_pct(script.get('f1'))}"
        lines.append(lex_line)
    lines.append("")

    label, groups = _chart_groups(summary)
    if groups:
        lines += [f"## Accuracy by {label}", ""]
        lex_groups = (lex or {}).get("by_category" if label == "category" else "by_type") or {}
        lines += _breakdown_lines(label, groups, lex_groups)
        lines.append("")
        if chart_name:
            lines += [f"![accuracy by {label}]({chart_name})", ""]
    if label == "category" and summary.get("by_type") and set(summary["by_type"]) - set(
        k.split(" ", 1)[-1] for k in groups
    ):
        lines += ["## Accuracy by type", ""]
        lines += _breakdown_lines("type", summary["by_type"], (lex or {}).get("by_type")) + [""]

    by_sample = summary.get("by_sample") or {}
    if by_sample:
        lines += ["## Accuracy by sample", ""]
        if len(by_sample) <= _MAX_SAMPLE_ROWS:
            lines += _breakdown_lines("sample", by_sample)
        else:
            accs = [g.get("accuracy") for g in by_sample.values() if g.get("accuracy") is not None]
            spread = f"; per-sample accuracy {min(accs):.2f}%–{max(accs):.2f}%" if accs else ""
            lines.append(f"{len(by_sample)} samples{spread}; the full table is in summary.json.")
        lines.append("")

    if summary.get("usage"):
        lines += ["## Token usage", ""] + _usage_lines(summary["usage"]) + [""]
    if summary.get("timing"):
        lines += ["## Wall time", ""] + _timing_lines(summary["timing"]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_chart_png(summary: Mapping[str, Any], *, title: str) -> bytes:
    """A horizontal bar chart of judged accuracy per category (LoCoMo) or per type, as PNG bytes."""
    import io

    # The object API with an explicit Agg canvas leaves pyplot's global backend and state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label, groups = _chart_groups(summary)
    names = list(groups) + ["overall"]
    values = [groups[k].get("accuracy") for k in groups] + [summary.get("accuracy")]
    counts = [groups[k].get("n", 0) for k in groups] + [summary.get("n_questions", 0)]
    without_adv = summary.get("without_adversarial")
    if without_adv:
        names.append("overall w/o adversarial")
        values.append(without_adv.get("accuracy"))
        counts.append(without_adv.get("n", 0))
    n_overall = len(names) - len(groups)

    fig = Figure(figsize=(7.5, 0.45 * len(names) + 1.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ypos = list(range(len(names)))
    colors = ["#4C72B0"] * len(groups) + ["#55A868"] * n_overall
    ax.barh(ypos, [v or 0.0 for v in values], color=colors)
    ax.set_yticks(ypos)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("judged accuracy (%)")
    for y, v, n in zip(ypos, values, counts):
        text = "n/a" if v is None else f"{v:.1f}%"
        ax.text((v or 0.0) + 1, y, f"{text} (n={n})", va="center", fontsize=8)
    heading = f"{title} — accuracy by {label}"
    if summary.get("baseline"):
        heading += "\n(offline baseline, not an LLM result)"
    ax.set_title(heading, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    run_dir: str | os.PathLike, summary: Mapping[str, Any], *, title: str
) -> dict[str, Path]:
    """Write ``report.md`` and ``accuracy_by_category.png`` into ``run_dir`` atomically; return their paths."""
    run_dir = Path(run_dir)
    chart_path = run_dir / CHART_NAME
    report_path = run_dir / REPORT_NAME
    _atomic_write_bytes(chart_path, render_chart_png(summary, title=title))
    _atomic_write_bytes(report_path, render_report(summary, title=title).encode("utf-8"))
    return {"report": report_path, "chart": chart_path}
