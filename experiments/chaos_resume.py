"""Crash-anywhere resume, tested as a user would: SIGKILL `python -m diet_jax.main` at random
moments in every phase, resume each time, and compare the end with an uninterrupted run.

    python experiments/chaos_resume.py                      # N = 10 kills on configs/synthetic.py:tiny
    python experiments/chaos_resume.py --kills=20 --seed=1
    python experiments/chaos_resume.py --kills=3 --reference=/path/to/finished/workdir

1. The reference: an uninterrupted run (or `--reference`, a finished workdir of the same
   config), timed phase by phase from its "phase: <name>" log lines.
2. N kills, spread over the phases (data, teacher, distill, candidates) in proportion to their
   reference durations, at least one per phase when N >= 4. A phase made of units that log a
   line when done (teacher and distillation stages, candidates) is killed after a random unit,
   never one of its last two, plus a short random delay: kill i waits for its phase's log line
   in the current attempt, then for as many newly finished units as separate its target from
   the previous kill's (an attempt resumes where the last kill left it), then SIGKILLs the
   process. Anchoring on units, not on seconds, lands the kill inside its phase however much
   faster a resumed attempt runs than the reference did (a compilation cache filled since, a
   lighter load); a phase without units (data) targets random points of its reference
   duration. The next attempt resumes in the same workdir.
3. A last attempt runs to the end. Its results.json (method, model, AUC, LogLoss; timings are
   not compared) and the distilled memory D_syn^T (SHA-256 of its arrays) are compared with the
   reference's, exactly.

Prints `kills survived: k/N, mismatches: m` (a kill is survived when the attempt after it
resumes without an error); exit status 0 only for N/N and 0 mismatches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

from diet_jax import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("data", "teacher", "distill", "candidates")


class Attempt:
    """One `python -m diet_jax.main` subprocess whose log lines are watched for phase marks."""

    def __init__(self, cmd: list[str], log_path: str, env: dict):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.marks: dict[str, float] = {}  # phase -> time its log line was seen
        self.done: dict[str, int] = {}  # phase -> units finished in this attempt (UNIT_LINE)
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            self.log.flush()
            if "] phase: " in line:
                with self.cond:
                    self.marks[line.rsplit("phase: ", 1)[1].strip()] = time.monotonic()
                    self.cond.notify_all()
            for phase, mark in UNIT_LINE.items():
                if mark in line:
                    with self.cond:
                        self.done[phase] = self.done.get(phase, 0) + 1
                        self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, phase: str) -> float | None:
        """When `phase` started in this attempt, or None if the process ended first."""
        with self.cond:
            while phase not in self.marks and self.proc.poll() is None:
                self.cond.wait(0.05)
            return self.marks.get(phase)

    def wait_units(self, phase: str, n: int) -> bool:
        """Wait until `n` units of `phase` finished in this attempt; False if it ended first."""
        with self.cond:
            while self.done.get(phase, 0) < n and self.proc.poll() is None:
                self.cond.wait(0.05)
            return self.done.get(phase, 0) >= n

    def current_phase(self) -> str | None:
        with self.cond:
            return max(self.marks, key=self.marks.get) if self.marks else None

    def finish(self) -> int:
        rc = self.proc.wait()
        self.reader.join()
        self.log.close()
        return rc


def run_to_end(cmd, log_path, env) -> tuple[int, dict[str, float], float]:
    start = time.monotonic()
    a = Attempt(cmd, log_path, env)
    rc = a.finish()
    return rc, a.marks, time.monotonic() - start


def phase_durations(marks: dict[str, float], end: float) -> dict[str, float]:
    seen = sorted((t, p) for p, t in marks.items())
    out = {}
    for i, (t, p) in enumerate(seen):
        out[p] = (seen[i + 1][0] if i + 1 < len(seen) else end) - t
    return out


def durations_from_results(workdir: str) -> dict[str, float]:
    """Phase seconds of a finished run, estimated from its results.json timings."""
    t = results.read(os.path.join(workdir, "results.json"))["timings"]
    data = t.get("data_seconds", 1.0)
    teacher = t.get("teacher_train_seconds", 1.0) + 1.0  # and the reference's evaluation
    distill = t.get("distill_seconds", 1.0)
    rest = t.get("total_seconds", data + teacher + distill) - data - teacher - distill
    return {"data": data, "teacher": teacher, "distill": distill, "candidates": max(rest, 1.0)}


# The log line a phase's unit of work writes when it is done (restored units write another).
UNIT_LINE = {
    "teacher": " samples/s, val AUC ",  # reference.py: "teacher stage_t: ... samples/s, val AUC"
    "distill": " rows, phase 1 ",  # driver.py: "distill stage_t: N rows, phase 1 ..."
    "candidates": " seeds (",  # methods.py: "<method> / <model>: test AUC ... over N seeds (...)"
}


def units_from_results(workdir: str) -> dict[str, int]:
    """Units of work per phase of a finished run: historical stages, candidates."""
    res = results.read(os.path.join(workdir, "results.json"))
    stages = sum(s.get("role") == "historical" for s in res.get("stages", []))
    return {
        "teacher": stages,
        "distill": len(res.get("timings", {}).get("distill_stages", {})),
        "candidates": len(res.get("results", [])),
    }


class Kill(NamedTuple):
    phase: str
    units: int  # finished units of the phase to wait for in this attempt (after its log line)
    delay: float  # seconds after that


def plan(
    n: int, durations: dict[str, float], units: dict[str, int], rng: random.Random
) -> list[Kill]:
    """The kills, in phase order."""
    phases = [p for p in PHASES if durations.get(p, 0) > 0]
    if n < len(phases):  # too few kills for every phase: the longest ones
        phases = sorted(sorted(phases, key=lambda p: -durations[p])[:n], key=PHASES.index)
    counts = {p: 1 for p in phases}
    total = sum(durations[p] for p in phases)
    for _ in range(n - len(phases)):  # the rest in proportion to the phases' durations
        p = max(phases, key=lambda q: durations[q] / total - counts[q] / n)
        counts[p] += 1
    out = []
    for p in phases:
        u = units.get(p, 0)
        if u >= 2:
            # After unit k (0 = at the phase's log line), k <= u - 2: at least two units are
            # left, so a short delay cannot outlast the attempt. Each kill waits for the units
            # between its target and the previous one (kept units are not redone).
            targets = sorted(rng.randint(0, u - 2) for _ in range(counts[p]))
            jitter = min(0.5, 0.5 * durations[p] / u)
            gaps = [t - s for s, t in zip([0, *targets], targets, strict=False)]
            out += [Kill(p, g, rng.uniform(0.0, jitter)) for g in gaps]
        else:
            # Targets spread over the phase's reference seconds; each kill waits for the gap
            # to the previous target, not the whole offset.
            targets = sorted(rng.uniform(0.02, 0.9) * durations[p] for _ in range(counts[p]))
            gaps = [t - s for s, t in zip([0.0, *targets], targets, strict=False)]
            out += [Kill(p, 0, max(g, 0.2)) for g in gaps]
    return out


def summary(workdir: str) -> dict:
    res = results.read(os.path.join(workdir, "results.json"))
    return {(r["method"], r["model"]): (r["auc"], r["logloss"]) for r in res["results"]}


def memory_hash(workdir: str) -> str:
    import numpy as np

    from diet_jax.distill import driver

    memory = driver.load_final(workdir)
    h = hashlib.sha256()
    for a in (memory.e_NxFxD, memory.logits_NxK, memory.origin_N, memory.row_N):
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="configs/synthetic.py:tiny")
    ap.add_argument("--workdir", default="/tmp/chaos_resume")
    ap.add_argument("--reference", default="", help="a finished workdir of the same config")
    ap.add_argument("overrides", nargs="*", help="extra flags, e.g. --config.ratio=0.1")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.makedirs(args.workdir, exist_ok=True)
    base = [sys.executable, "-m", "diet_jax.main", f"--config={args.config}", *args.overrides]
    rng = random.Random(args.seed)

    # ---- the reference: uninterrupted (timed per phase)
    if args.reference:
        ref_dir = args.reference
        durations = durations_from_results(ref_dir)
        print(f"reference: {ref_dir} (finished; phase seconds from its results.json timings)")
    else:
        ref_dir = os.path.join(args.workdir, "reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        log = os.path.join(args.workdir, "reference.log")
        start = time.monotonic()
        rc, marks, seconds = run_to_end(base + [f"--workdir={ref_dir}"], log, env)
        if rc != 0:
            print(f"the reference run failed (exit {rc}); see {log}")
            return 1
        durations = phase_durations(marks, start + seconds)
    print("reference phase seconds:", {p: round(d, 1) for p, d in durations.items()})

    # ---- N kills, then a last attempt to the end
    chaos = os.path.join(args.workdir, "chaos")
    shutil.rmtree(chaos, ignore_errors=True)
    cmd = base + [f"--workdir={chaos}"]
    units = units_from_results(ref_dir)
    kills = plan(args.kills, durations, units, rng)
    landed: dict[str, int] = {}
    outcomes = []  # per attempt: "killed", "finished" or "failed"
    for i, kill in enumerate(kills):
        log = os.path.join(args.workdir, f"attempt_{i:02d}.log")
        a = Attempt(cmd, log, env)
        t = a.wait_for(kill.phase)
        if t is not None and kill.units:
            a.wait_units(kill.phase, kill.units)
            t = time.monotonic()
        if t is not None:
            time.sleep(max(0.0, t + kill.delay - time.monotonic()))
        if a.proc.poll() is None:
            where = a.current_phase()
            a.proc.send_signal(signal.SIGKILL)
            a.finish()
            landed[where] = landed.get(where, 0) + 1
            outcomes.append("killed")
            after = f"{kill.units} more finished units" if kill.units else "its start"
            print(
                f"kill {i + 1}: in phase {where}, {kill.delay:.1f}s after {after}"
                f" (planned: {kill.phase})"
            )
        else:
            rc = a.finish()
            outcomes.append("finished" if rc == 0 else "failed")
            print(f"kill {i + 1}: not landed, the attempt ended first (exit {rc}); see {log}")
    rc = run_to_end(cmd, os.path.join(args.workdir, "final.log"), env)[0]
    outcomes.append("finished" if rc == 0 else "failed")
    if rc != 0:
        print(f"the last attempt failed (exit {rc}); see {args.workdir}/final.log")
    # Kill i is survived when it landed and the attempt after it resumed without an error.
    survived = sum(
        outcomes[i] == "killed" and outcomes[i + 1] in ("killed", "finished")
        for i in range(len(kills))
    )

    # ---- compare with the reference
    mismatches = 0
    if rc == 0:
        want, got = summary(ref_dir), summary(chaos)
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                mismatches += 1
                print(f"mismatch {key}: reference {want.get(key)}, resumed {got.get(key)}")
        hw, hg = memory_hash(ref_dir), memory_hash(chaos)
        if hw != hg:
            mismatches += 1
            print(f"mismatch distilled memory: reference {hw[:16]}, resumed {hg[:16]}")
        print(f"compared {len(want)} results and the distilled memory ({hw[:16]})")
    else:
        mismatches = -1
    n = len(kills)
    print("kills per phase:", {p: landed.get(p, 0) for p in PHASES})
    print(f"kills survived: {survived}/{n}, mismatches: {mismatches}")
    return 0 if survived == n and mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
