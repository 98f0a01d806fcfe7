"""Hostile load: 200 concurrent requests mixing valid joint rollouts with every hostile input of issue 8, while the
scripted LLM answers ~10% faults (HTTP 500, 429, broken judge JSON) and is killed for 5 s mid-wave.

Both servers run as real processes. Phases:

1. reference: the valid joint rollouts and /build_and_qa requests scored once against a fault-free LLM (the
   grounded responder: answers from what was retrieved, judged against the gold, so a reward depends on the memory);
2. the wave: 200 requests at once, the LLM restarted with faults and killed (SIGKILL) for `--outage` seconds after
   `--outage-at`; like veRL, a client retries a `retryable` 503 with the same body (and sample key);
3. SIGTERM with a joint rollout still waiting for its partners and a long request running.

Checks, and prints: every request answered within its timeout with its documented code (200, 401, 403, 404, 413,
422; 503 only with `retryable: true`), no reward different from the reference (an outage never scores a question
WRONG), every failed LLM call counted in /stats, /health p50/p99/max (polled from a separate process every 20 ms
throughout), the reward server's peak RSS, and the SIGTERM-to-exit time.

    python -m scripts.bench.hostile_reward_server [--outage 5] [--fault-rate 0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from scripts.bench.bench_reward_server import build_states, cpu_seconds  # noqa: E402
from scripts.bench.load_reward_server import RssSampler  # noqa: E402
from memory_system import AGENTS  # noqa: E402
from scripts.bench.reward_harness import (free_port, kill, policy_outputs, qa_pairs,  # noqa: E402
                                          reward_server_process, scripted_server_process, session_actions)

TOKEN = "hostile-bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NESTED = '{"a":' * 1500 + "1" + "}" * 1500
HOSTILE_OUTPUTS = {
    "nested 1500": NESTED,
    "48k braces": "{" * 48000,
    "10k operations": json.dumps({"operations": [{"action": "ADD", "memory": "x"}] * 10_000}),
    "64k junk": "{" + "a," * 32000 + "}",
    "wrong types": {"operations": [{"action": ["ADD"], "memory": {"deep": [[[1]]]}}]},
    "unknown keys": {"operations": [], "action": "ADD", "memory": "..."},
}


def make_bad_states(root: Path, good: Path) -> dict[str, tuple[str, int]]:
    """Unreadable or refused state paths and the status each must get."""
    bad = root / "bad"
    files = {"truncated_index": {"memory.json": (good / "memory.json").read_bytes(),
                                 "index.faiss": (good / "index.faiss").read_bytes()[:100]},
             "list_memory": {"memory.json": b"[1, 2]"},
             "latin1_memory": {"memory.json": '{"core": "caf\u00e9"}'.encode("latin-1")}}
    for name, content in files.items():
        (bad / name).mkdir(parents=True)
        for f, data in content.items():
            (bad / name / f).write_bytes(data)
    (bad / "loop_a").symlink_to(bad / "loop_b")
    (bad / "loop_b").symlink_to(bad / "loop_a")
    leak = root / "leaky"
    leak.mkdir()
    (leak / "memory.json").write_bytes((good / "memory.json").read_bytes())
    (leak / "index.faiss").symlink_to("/etc/hostname")
    return {"symlink loop": ("bad/loop_a", 422), "NUL byte": ("state\x00x", 422),
            "5000-char component": ("x" * 5000, 422), "truncated index": ("bad/truncated_index", 422),
            "memory.json a list": ("bad/list_memory", 422), "memory.json not UTF-8": ("bad/latin1_memory", 422),
            "outside the root": ("/etc", 403), "symlinked file": ("leaky", 403), "missing": ("nowhere", 404)}


def poll_health(url: str, stop, conn) -> None:
    """In its own process: /health every 20 ms until told to stop; sends back the latencies."""
    lat = []
    with httpx.Client(timeout=10) as h:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                h.get(url + "/health")
                lat.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                lat.append(float("inf"))
            time.sleep(0.02)
    conn.send(lat)


class Case:
    def __init__(self, name: str, path: str, *, body=None, content: bytes | None = None, headers=None,
                 expect: set[int], ref_key: str | None = None, abandon_after: float | None = None,
                 declared_bytes: int | None = None):
        self.declared_bytes = declared_bytes  # send only headers declaring this Content-Length, then read
        self.name, self.path, self.body, self.content = name, path, body, content
        self.headers = AUTH if headers is None else headers
        self.expect, self.ref_key, self.abandon_after = expect, ref_key, abandon_after
        self.status: int | None = None
        self.doc: dict = {}
        self.attempts = 0
        self.elapsed = 0.0
        self.error: str | None = None


def valid_bodies(state: str, n_groups: int, n_build: int) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(joint-rollout samples, build_and_qa bodies), each with the key its reference reward is stored under."""
    joints = []
    for g in range(n_groups):
        hostile = list(HOSTILE_OUTPUTS)[g % len(HOSTILE_OUTPUTS)] if g >= n_groups - 2 * len(HOSTILE_OUTPUTS) \
            else None
        outs = policy_outputs(f"g{g}")
        for i, a in enumerate(AGENTS):
            out = HOSTILE_OUTPUTS[hostile] if hostile and i == g % 4 else outs[a]
            joints.append((f"joint/{g}", {"session_group_id": f"hostile/{g}", "agent": a, "output": out,
                                          "state_path": state, "qa_pairs": qa_pairs(4), "timeout_s": 30,
                                          "expert_outputs": session_actions(8), "sample_key": f"k{g}-{a}"}))
    builds = [(f"build/{i}", {"session_group_id": f"build/{i}", "state_path": state,
                              "actions": policy_outputs(f"b{i}"), "qa_pairs": qa_pairs(4)}) for i in range(n_build)]
    return joints, builds


async def send_declared(url: str, case: Case, timeout_s: float) -> None:
    """Headers only, announcing a body of `declared_bytes`: the server must answer before reading any of it."""
    from urllib.parse import urlparse

    u = urlparse(url)
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        head = f"POST {case.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {case.declared_bytes}\r\n" + \
               "".join(f"{k}: {v}\r\n" for k, v in case.headers.items()) + "\r\n"
        writer.write(head.encode("latin-1"))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout_s)
        writer.close()
        case.attempts = 1
        case.status = int(status_line.split()[1])
    except (OSError, ValueError, IndexError, asyncio.TimeoutError) as exc:
        case.error = f"{type(exc).__name__}: {exc}"
    case.elapsed = time.perf_counter() - t0


async def send(h: httpx.AsyncClient, url: str, case: Case, *, max_attempts: int, timeout_s: float) -> None:
    if case.declared_bytes is not None:
        return await send_declared(url, case, timeout_s)
    t0 = time.perf_counter()
    for attempt in range(max_attempts):
        case.attempts = attempt + 1
        try:
            kw = {"json": case.body} if case.content is None else {"content": case.content}
            req = h.post(url + case.path, headers=case.headers, timeout=timeout_s, **kw)
            if case.abandon_after is None:
                r = await req
            else:
                try:
                    r = await asyncio.wait_for(req, case.abandon_after)
                except asyncio.TimeoutError:
                    case.status, case.elapsed = -1, time.perf_counter() - t0  # the client left, as planned
                    return
        except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as exc:
            if 413 in case.expect:  # answered 413 and closed while we were still sending
                case.status, case.elapsed = 413, time.perf_counter() - t0
                return
            case.error = f"{type(exc).__name__}: {exc}"
            return
        except httpx.HTTPError as exc:
            case.error = f"{type(exc).__name__}: {exc}"
            return
        case.status = r.status_code
        try:
            case.doc = r.json()
        except ValueError:
            case.doc = {}
        if r.status_code == 503 and case.doc.get("retryable") is True and attempt + 1 < max_attempts:
            await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt))
            continue
        break
    case.elapsed = time.perf_counter() - t0


def reward_of(case: Case) -> float | None:
    return case.doc.get("task_reward") if case.status == 200 else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.hostile_reward_server",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--outage", type=float, default=5.0, help="seconds the LLM server is down mid-wave")
    p.add_argument("--outage-at", type=float, default=1.0, help="seconds into the wave it goes down")
    p.add_argument("--fault-rate", type=float, default=0.1, help="LLM faults: 4/10 HTTP 500, 3/10 429, 3/10 bad JSON")
    p.add_argument("--latency", type=float, default=0.05, help="seconds per scripted LLM request")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per attempt, seconds")
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--llm-retries", type=int, default=2,
                   help="the reward server's --max-retries: few enough that the outage exhausts them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    f = args.fault_rate
    with tempfile.TemporaryDirectory(prefix="hostile_reward_") as tmp:
        root = Path(tmp)
        (state,) = asyncio.run(build_states(root, 1))
        bad_paths = make_bad_states(root, Path(state))
        joints, builds = valid_bodies(state, n_groups=32, n_build=12)
        port = free_port()
        llm = scripted_server_process(port=port, latency=args.latency, responder="grounded").start()
        rs = reward_server_process(root, llm.url, token=TOKEN, max_in_flight=args.max_in_flight,
                                   extra=["--rendezvous-timeout", "3600", "--max-retries", str(args.llm_retries)]
                                   ).start()
        sampler = RssSampler(rs.pid)
        try:
            # 1. reference rewards, fault-free
            async def reference() -> dict[str, float]:
                async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=None)) as h:
                    cases = [Case(k, "/joint_rollout", body={**b, "sample_key": "ref-" + b["sample_key"],
                                                             "session_group_id": "ref-" + b["session_group_id"]},
                                  expect={200}) for k, b in joints]
                    cases += [Case(k, "/build_and_qa", body=b, expect={200}) for k, b in builds]
                    await asyncio.gather(*(send(h, rs.url, c, max_attempts=1, timeout_s=args.timeout)
                                           for c in cases))
                bad = [c for c in cases if c.status != 200]
                if bad:
                    raise SystemExit(f"reference phase failed: {[(c.name, c.status, c.error) for c in bad[:5]]}")
                return {c.name: c.doc["task_reward"] for c in cases}

            ref = asyncio.run(reference())
            # 2. the wave: LLM with faults, killed mid-wave
            kill(llm)
            llm = scripted_server_process(port=port, latency=args.latency, responder="grounded", fail_500=0.4 * f,
                                          fail_429=0.3 * f, malformed=0.3 * f, malformed_prefix="judge",
                                          seed=7).start()
            stats0 = httpx.get(rs.url + "/stats", headers=AUTH).json()
            cases = wave_cases(state, bad_paths, joints, builds)
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            parent, child = ctx.Pipe()
            poller = ctx.Process(target=poll_health, args=(rs.url, stop, child), daemon=True)
            poller.start()
            time.sleep(1.0)  # the spawned interpreter imports httpx before it probes
            sampler.__enter__()
            load0, cpu0 = os.getloadavg()[0], (cpu_seconds(rs.pid), cpu_seconds(llm.pid))
            outage_log: dict[str, float] = {}

            def outage(server_box: list) -> None:
                time.sleep(args.outage_at)
                outage_log["down"] = time.perf_counter()
                kill(server_box[0])
                time.sleep(args.outage)
                server_box[0].start()
                outage_log["up"] = time.perf_counter()

            box = [llm]
            t_out = threading.Thread(target=outage, args=(box,))

            async def wave() -> float:
                async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as h:
                    t0 = time.perf_counter()
                    t_out.start()
                    await asyncio.gather(*(send(h, rs.url, c, max_attempts=8, timeout_s=args.timeout)
                                           for c in cases))
                    return time.perf_counter() - t0

            wall = asyncio.run(wave())
            t_out.join()
            llm = box[0]
            machine = {"load_start": load0, "load_end": os.getloadavg()[0], "cpus": os.cpu_count(),
                       "server_cpu_s": cpu_seconds(rs.pid) - cpu0[0]}
            stats1 = httpx.get(rs.url + "/stats", headers=AUTH).json()
            stop.set()
            lat = parent.recv()
            poller.join(timeout=10)
            # 3. SIGTERM with a waiting joint rollout and a long request
            term = sigterm_phase(rs, state)
            sampler.__exit__()
        finally:
            rs.stop()
            llm.stop()
    return report(args, cases, ref, stats0, stats1, lat, sampler, wall, term, machine)


def wave_cases(state: str, bad_paths: dict, joints, builds) -> list[Case]:
    def jr(group: str, **over) -> dict:
        return {"session_group_id": group, "agent": "core", "output": "{}", "state_path": state,
                "qa_pairs": qa_pairs(2), "timeout_s": 1, **over}

    def bq(**over) -> dict:
        return {"session_group_id": "h", "state_path": state, "actions": policy_outputs("h"), "qa_pairs": qa_pairs(2),
                **over}

    js = {**AUTH, "Content-Type": "application/json"}
    big = b"[" + b"1," * (10 * 2 ** 20) + b"1]"  # 20 MB, over the 8 MiB default limit
    cases = [Case(k, "/joint_rollout", body=b, expect={200}, ref_key=k) for k, b in joints]
    cases += [Case(k, "/build_and_qa", body=b, expect={200}, ref_key=k) for k, b in builds]
    for i in range(3):
        cases.append(Case("no token", "/build_and_qa", body=bq(), headers={}, expect={401}))
        cases.append(Case("wrong token", "/joint_rollout", body=jr("t"), headers={"Authorization": "Bearer x"},
                          expect={403}))
    cases.append(Case("92 MB body without token", "/build_and_qa", headers={}, declared_bytes=92 * 10 ** 6,
                      expect={401}))
    cases.append(Case("92 MB body", "/build_and_qa", headers=AUTH, declared_bytes=92 * 10 ** 6, expect={413}))
    cases.append(Case("92 MB body", "/joint_rollout", headers=AUTH, declared_bytes=92 * 10 ** 6, expect={413}))
    cases.append(Case("20 MB body sent", "/build_and_qa", content=big, headers=js, expect={413}))
    for ep in ("/build_and_qa", "/joint_rollout"):
        cases.append(Case("non-UTF-8 body", ep, content=b"\xff\xfe\x00 garbage", headers=js, expect={422}))
        cases.append(Case("10^4-deep JSON", ep, content=b"[" * 10_000 + b"]" * 10_000, headers=js, expect={422}))
        cases.append(Case("not JSON", ep, content=b"{nope", headers=js, expect={422}))
    for name, (path, code) in bad_paths.items():
        cases.append(Case(f"state: {name}", "/build_and_qa", body=bq(state_path=path), expect={code}))
        cases.append(Case(f"state: {name}", "/joint_rollout", body=jr(f"bad/{name}", state_path=path),
                          expect={code}))
    many = [{"question": f"q{i}?", "answer": "a"} for i in range(10_000)]
    cases.append(Case("10,000 QA pairs", "/build_and_qa", body=bq(qa_pairs=many), expect={422}))
    cases.append(Case("10,000 QA pairs", "/joint_rollout", body=jr("many", qa_pairs=many), expect={422}))
    cases.append(Case("default_reward 1e308", "/joint_rollout",
                      body=jr("sparse", sparse={"drop_rate": 1.0, "default_reward": 1e308}), expect={422}))
    cases.append(Case("20,000-char question", "/build_and_qa",
                      body=bq(qa_pairs=[{"question": "q" * 20_000, "answer": "a"}]), expect={422}))
    cases.append(Case("unknown agent", "/joint_rollout", body=jr("u", agent="archivist"), expect={422}))
    cases.append(Case("sample_key of another group", "/joint_rollout",  # a key the reference phase used
                      body=jr("thief", sample_key="ref-" + joints[0][1]["sample_key"]), expect={422}))
    for i in range(3):
        cases.append(Case("client leaves after 0.3 s", "/build_and_qa", body=bq(session_group_id=f"leave{i}",
                                                                               qa_pairs=qa_pairs(5)),
                          expect={-1}, abandon_after=0.3))
    n = 0
    while len(cases) < 200:  # pad with valid requests of the same kind as the reference
        k, b = builds[n % len(builds)]
        cases.append(Case(k, "/build_and_qa", body={**b, "session_group_id": f"{b['session_group_id']}/{n}"},
                          expect={200}, ref_key=k))
        n += 1
    return cases


def sigterm_phase(rs, state: str) -> dict:
    results: dict[str, object] = {}

    def call(name: str, path: str, body: dict) -> None:
        try:
            r = httpx.post(rs.url + path, json=body, headers=AUTH, timeout=60)
            results[name] = (r.status_code, r.json())
        except Exception as exc:  # noqa: BLE001 - reported
            results[name] = exc

    lone = {"session_group_id": "term/1", "agent": "core", "output": policy_outputs("t")["core"],
            "state_path": state, "qa_pairs": qa_pairs(2), "expert_outputs": session_actions(8), "timeout_s": 3600}
    long = {"session_group_id": "term/2", "state_path": state, "actions": policy_outputs("t"),
            "qa_pairs": [{"question": f"What happened on day {i}?", "answer": "x"} for i in range(60)]}
    threads = [threading.Thread(target=call, args=("waiting slot", "/joint_rollout", lone)),
               threading.Thread(target=call, args=("long request", "/build_and_qa", long))]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while time.time() < deadline:
        if httpx.get(rs.url + "/stats", headers=AUTH).json()["rendezvous"]["open_slots"] >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.perf_counter()
    rs.proc.send_signal(signal.SIGTERM)
    rs.proc.wait(timeout=60)
    exit_s = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=30)
    return {"exit_s": exit_s, "results": results}


def report(args, cases: list[Case], ref: dict, stats0: dict, stats1: dict, lat: list[float], sampler,
           wall: float, term: dict, machine: dict) -> int:
    problems: list[str] = []
    by_code = Counter()
    wrong = 0
    retried = 0
    for c in cases:
        by_code[c.status] += 1
        retried += c.attempts > 1
        if c.error is not None:
            problems.append(f"{c.name} {c.path}: no answer ({c.error})")
        elif c.status not in c.expect and not (c.status == 503 and c.doc.get("retryable") is True and 200 in c.expect):
            problems.append(f"{c.name} {c.path}: HTTP {c.status}, expected {sorted(c.expect)}: "
                            f"{str(c.doc.get('reason'))[:120]}")
        if c.status not in (-1, None) and c.elapsed > args.timeout * c.attempts:
            problems.append(f"{c.name}: answered after {c.elapsed:.1f} s")
        if c.ref_key is not None and c.status == 200 and reward_of(c) != ref[c.ref_key]:
            wrong += 1
            problems.append(f"{c.name}: reward {reward_of(c)} != reference {ref[c.ref_key]}")
        if c.status == 200 and c.doc.get("task") is not None and c.doc["task"].get("failed_questions"):
            problems.append(f"{c.name}: failed questions in a 200")
    e0, e1 = stats0["engine"], stats1["engine"]
    failures = {k: e1["llm_failures"][k] - e0["llm_failures"][k] for k in e1["llm_failures"]}
    upstream = e1["upstream_failures"] - e0["upstream_failures"]
    unresolved_503 = sum(1 for c in cases if c.status == 503)
    finite = sorted(x for x in lat if x != float("inf"))
    lost = len(lat) - len(finite)
    p = (lambda q: finite[min(len(finite) - 1, int(q * (len(finite) - 1)))] * 1000) if finite else (lambda q: -1)
    if lost or not finite or p(0.99) >= 100:
        problems.append(f"/health p99 {p(0.99):.1f} ms (>= 100) or {lost} probes without an answer")
    if failures["total"] < upstream:
        problems.append(f"{upstream} requests failed upstream but only {failures['total']} failed LLM calls counted")
    if e1["llm_slots"]["in_flight"] != 0 or stats1["rendezvous"]["open_slots"] != 0 or \
            stats1["rendezvous"]["running"] != 0:
        problems.append(f"work left after the wave: {e1['llm_slots']}, {stats1['rendezvous']}")
    exit_s = term["exit_s"]
    if exit_s >= 10:
        problems.append(f"SIGTERM took {exit_s:.1f} s")
    for name, res in term["results"].items():
        if isinstance(res, Exception):
            problems.append(f"SIGTERM phase, {name}: no answer ({res})")
        elif res[0] != 200 and not (res[0] == 503 and res[1].get("retryable") is True):
            problems.append(f"SIGTERM phase, {name}: HTTP {res[0]}")
    peak = max(stats1["memory"]["peak_rss_mb"], sampler.peak)
    valid = [c for c in cases if c.ref_key is not None]
    print(f"hostile wave: {len(cases)} concurrent requests ({len(valid)} valid: joint-rollout samples and "
          f"/build_and_qa; {len(cases) - len(valid)} hostile), LLM faults {args.fault_rate:.0%}, LLM killed "
          f"{args.outage:.0f} s after {args.outage_at:.0f} s; wall {wall:.1f} s")
    print(f"answers by code (final, after the client's retries of retryable 503s): "
          f"{dict(sorted((str(k), v) for k, v in by_code.items()))}; {retried} requests retried at least once")
    print(f"valid requests with the reference reward: {sum(1 for c in valid if c.status == 200) - wrong} of "
          f"{len(valid)}; wrong rewards: {wrong}; still 503 after 8 attempts: {unresolved_503}")
    print(f"failed LLM calls counted in /stats during the wave: {failures}; requests failed upstream (503): "
          f"{upstream}; LLM requests {e1['llm_requests'] - e0['llm_requests']}; cancelled (client left): "
          f"{e1['cancelled'] - e0['cancelled']}")
    print(f"/health over the wave: {len(lat)} probes from another process, p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, "
          f"max {p(1.0):.1f} ms, unanswered {lost}")
    print(f"reward server RSS: peak {peak:.0f} MB (sampled every 50 ms and ru_maxrss); after the wave "
          f"{stats1['memory']['rss_mb']} MB")
    print(f"SIGTERM with a waiting joint rollout and a 60-question request running: exit after {exit_s:.2f} s; "
          + ", ".join(f"{n}: {r if isinstance(r, Exception) else 'HTTP ' + str(r[0])}"
                      for n, r in term["results"].items()))
    print(f"machine: {machine['cpus']} CPUs, load average {machine['load_start']:.1f} at the start of the wave, "
          f"{machine['load_end']:.1f} at its end; the reward server used {machine['server_cpu_s']:.1f} CPU s in "
          f"{wall:.1f} s (a /health probe waits for CPU time on a loaded machine too)")
    for line in problems[:30]:
        print("PROBLEM:", line)
    print("PASS" if not problems else f"FAIL ({len(problems)} problems)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
