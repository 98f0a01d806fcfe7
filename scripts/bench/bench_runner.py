"""Evaluation speed against the scripted server: measured time / ideal time, measured in one run.

Build: N samples with `--parallel --workers N` against the critical path: one look-ahead trip (every session's
retrieval query embedded at the sample's start) plus the longest sample's sessions x 2 round trips (the four agents
at once, then embedding the new entries). Answer + judge: Q questions with `--concurrency C` against Q x 2 requests
(answer, judge; the questions' embeddings are batched ahead) x latency / C, at C = 32 (limit 1.25) and, for 2,000
questions, at C = 128 (limit 1.5). Stage wall times come from the run's summary (the preflight is not included), and
so does each stage's CPU (the runner's process and its HTTP worker processes, `--client-processes`), given per LLM
request. For reference it also times the release's way of building: one sample after another.

    python -m scripts.bench.bench_runner [--latency 0.1] [--samples 8] [--questions-per-sample 250]
                                         [--client-processes 2]
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
LIMIT_BUILD, LIMIT_C32, LIMIT_C128 = 1.25, 1.25, 1.5


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
    p.add_argument("--questions-per-sample", type=int, default=250,
                   help="questions per sample (all of them are answered at C = 128; the first 32 at C = 32)")
    p.add_argument("--skip-sequential", action="store_true", help="do not time the one-after-another build")
    p.add_argument("--client-processes", type=int, default=2,
                   help="the runner's --client-processes (1: the SDK's requests on the event loop)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scripts.bench.machine import cpu_steal, steal_share

    server, url = start_scripted_server(args.latency)
    st0 = cpu_steal()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "dialogues.json"
            s_max, n_q = make_dialogues(data, args.samples, args.questions_per_sample)
            common = ["--dataset", "dialogues", "--dataset-path", str(data), "--provider", "openai", "--base-url", url,
                      "--api-key", "bench", "--max-in-flight", "256", "--client-processes", str(args.client_processes)]
            run_runner([*common, "--mode", "build", "--parallel", "--workers", str(args.samples),
                        "--db-path", str(tmp / "db"), "--output-dir", str(tmp / "b")])
            build_timing = json.loads((tmp / "b" / "build.json").read_text())["timing"]
            build_s = build_timing["build_wall_s"]
            build_ideal = (2 * s_max + 1) * args.latency
            answers = []
            for c, per_sample, limit in ((32, min(32, args.questions_per_sample), LIMIT_C32),
                                         (128, args.questions_per_sample, LIMIT_C128)):
                out = tmp / f"a{c}"
                run_runner([*common, "--mode", "answer", "--concurrency", str(c), "--questions", str(per_sample),
                            "--db-path", str(tmp / "db"), "--output-dir", str(out)])
                summary = json.loads((out / "summary.json").read_text())
                t = summary["timing"]["answer_judge_wall_s"]
                n = per_sample * args.samples
                requests = sum(u["requests"] for stage in ("answer", "judge")
                               for task, u in summary["usage_this_invocation"].get(stage, {}).items() if not task.startswith("embed"))
                cpu_ms = 1000 * summary["timing"]["answer_judge_cpu_s"] / max(1, requests)
                answers.append((c, n, t, 2 * n * args.latency / c, limit, cpu_ms))
            seq_s = None
            if not args.skip_sequential:
                run_runner([*common, "--mode", "build", "--db-path", str(tmp / "db_seq"), "--output-dir",
                            str(tmp / "seq")])
                seq_s = json.loads((tmp / "seq" / "build.json").read_text())["timing"]["build_wall_s"]
    finally:
        server.terminate()
        server.wait(timeout=10)
    steal = steal_share(st0, cpu_steal())
    b_ratio = build_s / build_ideal
    print(f"scripted server latency {args.latency * 1000:.0f} ms per request; the runner with --client-processes "
          f"{args.client_processes}; the hypervisor took {steal:.0%} of the machine's CPU time during the run (steal)")
    print(f"build  : {args.samples} samples (longest {s_max} sessions), --parallel --workers {args.samples}: "
          f"{build_s:.2f} s vs (2 x {s_max} + 1) x {args.latency:.2f} = {build_ideal:.2f} s -> ratio {b_ratio:.2f} "
          f"(limit {LIMIT_BUILD})")
    if seq_s is not None:
        print(f"         one sample after another (the release's way): {seq_s:.2f} s ({seq_s / build_s:.1f}x slower)")
    ok = b_ratio <= LIMIT_BUILD
    for c, n, t, ideal, limit, cpu_ms in answers:
        print(f"answer : {n} questions, --concurrency {c}: {t:.2f} s vs {n} x 2 x {args.latency:.2f} / {c} = "
              f"{ideal:.2f} s -> ratio {t / ideal:.2f} (limit {limit}); {cpu_ms:.2f} ms of CPU per LLM request")
        ok = ok and t / ideal <= limit
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
