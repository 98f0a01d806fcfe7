"""Evaluation speed against the scripted server: measured time / ideal time, measured in one run.

Build: N samples with `--parallel --workers N` against the critical path, i.e. the longest sample's sessions x
the round trips one session needs when its four agents run together (embed the session to find related entries,
the four agents at once, embed the new entries; the first session has nothing to search). Answer + judge: Q questions
with `--concurrency C` against Q x 3 requests (embed the question, answer, judge) x latency / C.
For reference it also times the release's way of building: one sample after another.

    python -m scripts.bench.bench_runner [--latency 0.1] [--samples 8] [--questions-per-sample 32] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1.5


def start_scripted_server(latency: float, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "scripts.scripted_server", "--latency", str(latency),
                             *(extra or [])], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"scripted server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def make_dialogues(path: Path, n_samples: int, q_per_sample: int) -> tuple[int, int]:
    from eval.datasets import Message, Question, Sample, Session, save_dialogues

    samples = []
    for s in range(n_samples):
        n_sessions = 6 + 2 * (s % 4)  # 6, 8, 10, 12 sessions
        sessions = [Session(id=f"s{s}-{k}", time=f"2024/0{1 + k % 9}/1{k % 10} (Mon) 10:00",
                            messages=[Message("user", f"Sample {s} session {k}: I visited place {k} with friend {s}."),
                                      Message("assistant", f"Noted visit {k}.")]) for k in range(n_sessions)]
        questions = [Question(id=f"q{s}-{i}", text=f"Where did I go in session {i % n_sessions} of sample {s}?",
                              answer=f"place {i % n_sessions}", type="single-session-user") for i in range(q_per_sample)]
        samples.append(Sample(id=f"bench-{s}", dataset="dialogues", sessions=sessions, questions=questions,
                              current_time="2024/12/01 (Sun) 10:00"))
    save_dialogues(samples, path)
    return max(len(s.sessions) for s in samples), sum(len(s.questions) for s in samples)


def run_runner(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "eval.runner", *args, "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"runner failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--questions-per-sample", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-sequential", action="store_true", help="do not time the one-after-another build")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server, url = start_scripted_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "dialogues.json"
            s_max, n_q = make_dialogues(data, args.samples, args.questions_per_sample)
            common = ["--dataset", "dialogues", "--dataset-path", str(data), "--provider", "openai", "--base-url", url,
                      "--api-key", "bench", "--output-dir", str(tmp / "run")]
            run_runner([*common, "--mode", "build", "--parallel", "--workers", str(args.samples),
                        "--db-path", str(tmp / "db")])
            build_s = json.loads((tmp / "run" / "build.json").read_text())["timing"]["total_s"]
            build_ideal = (3 * s_max - 1) * args.latency
            run_runner([*common, "--mode", "answer", "--concurrency", str(args.concurrency),
                        "--db-path", str(tmp / "db")])
            answer_s = json.loads((tmp / "run" / "summary.json").read_text())["timing"]["total_s"]
            answer_ideal = n_q * 3 * args.latency / args.concurrency
            seq_s = None
            if not args.skip_sequential:
                run_runner([*common, "--mode", "build", "--db-path", str(tmp / "db_seq")])
                seq_s = json.loads((tmp / "run" / "build.json").read_text())["timing"]["total_s"]
    finally:
        server.terminate()
        server.wait(timeout=10)
    b_ratio, a_ratio = build_s / build_ideal, answer_s / answer_ideal
    print(f"scripted server latency {args.latency * 1000:.0f} ms per request")
    print(f"build  : {args.samples} samples (longest {s_max} sessions), --parallel --workers {args.samples}: "
          f"{build_s:.2f} s vs critical path {build_ideal:.2f} s -> ratio {b_ratio:.2f} (limit {LIMIT})")
    if seq_s is not None:
        print(f"         one sample after another (the release's way): {seq_s:.2f} s ({seq_s / build_s:.1f}x slower)")
    print(f"answer : {n_q} questions, --concurrency {args.concurrency}: {answer_s:.2f} s vs "
          f"{n_q} x 3 x {args.latency:.2f} / {args.concurrency} = {answer_ideal:.2f} s -> ratio {a_ratio:.2f} (limit {LIMIT})")
    ok = b_ratio <= LIMIT and a_ratio <= LIMIT
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
