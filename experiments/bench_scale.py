"""Scale benchmark: the whole `main` pipeline on Taobao-format files of 1M, 4M, 16M lines.

    nice -n 10 python experiments/bench_scale.py --root=/tmp/bench_scale --sizes=1e6,4e6,16e6

For every size: `data/synthetic_taobao.py` writes `UserBehavior.csv` (fixed vocabularies: more
lines = more interactions of the same 50k users and 200k items), then a subprocess runs
`diet_jax.main` on `configs/taobao_synth.py` (the real Taobao reader) with a reduced evaluation
(`BENCH_OVERRIDES`: one candidate backbone, DCN; methods warmup_start, random, el2n, kmeans, diet;
2 epochs on the reduced rows; the rows' rate chosen on the rows epochs, `evaluate.lr_select =
"rows"`). Inside the subprocess each phase is timed and its peak memory
sampled every 0.2 s from /proc/self/status (VmRSS, and RssAnon = memory the process owns; the
rest of VmRSS is file pages of the memmapped store, which the kernel can drop). Phases: preprocess
(the reader), teacher, phase 1, phase 2 (the rest of the distillation), each selection
baseline's selection, each method's candidate, report, other (startup, reference evaluation).
The parent fits seconds ~ rows^b per phase (least squares in log-log) and extrapolates to 100M
lines on this CPU both with that power law and with the marginal cost between the two largest
sizes (affine); it writes <root>/bench_scale.json and bench_scale.md. `--table_only` redraws
the table from the JSON of finished sizes. `--reader_only`: the preprocess phase alone (the
reader's growth exponent in minutes instead of the whole pipeline's hour), stopping the run
after the stage store is written.

    python experiments/bench_scale.py --root=/tmp/bench_reader --sizes=1e6,4e6,16e6 --reader_only

`--accelerator_json=A --cpu_json=C [--loader_samples_per_s=R]` adds a 100M-line forecast on an
accelerator: each phase's affine CPU forecast divided by the speed-up of the kernel it mostly runs
(bench_gpu.py's JSON on the accelerator, A, against the same script at the same sizes on this CPU,
C: `bench_gpu.py --nosmall --json=C`): teacher, phase 1, EL2N and candidates by the train step's,
phase 2 by the outer iteration's; host phases (the reader, K-means, report, other) at the CPU's
pace; one pass over the store (teacher, phase 1) no faster than the host loader's R samples/s
(`bench_teacher.py --loader_only`). An estimate, printed as one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "taobao_synth.py")
BENCH_OVERRIDES = {
    "evaluate.models": "('dcn',)",
    "evaluate.methods": "('warmup_start','random','el2n','kmeans','diet')",
    "evaluate.max_epochs": "2",
    # The rows' rate chosen on the rows epochs, as in every recorded table (docs/scale.md); the
    # default "final" adds lr_select_top - 1 fine-tunes per reduced candidate (first seed).
    "evaluate.lr_select": "rows",
    "progress": "False",
}


# ------------------------------------------------------------------ child: one pipeline run


def _status_kb() -> tuple[int, int]:
    rss = anon = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return rss, anon


class _Phases:
    """A stack of phase names; a sampler thread charges memory to the innermost one."""

    def __init__(self):
        self.stack = ["other"]
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.done = False

    def sample(self):
        rss, anon = _status_kb()
        with self.lock:
            p = self.peak.setdefault(self.stack[-1], [0, 0])
            p[0], p[1] = max(p[0], rss), max(p[1], anon)

    def loop(self):
        while not self.done:
            self.sample()
            time.sleep(0.2)

    def wrap(self, fn, name_fn):
        def wrapped(*args, **kwargs):
            name = name_fn(*args, **kwargs)
            self.sample()
            with self.lock:
                self.stack.append(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - start
                self.sample()
                with self.lock:
                    self.stack.pop()
                    self.seconds[name] = self.seconds.get(name, 0.0) + dt
                    # Nested phases (phase 1 inside the distillation) are not charged twice.
                    if self.stack[-1] != "other":
                        outer = self.stack[-1]
                        self.seconds[outer] = self.seconds.get(outer, 0.0) - dt

        return wrapped


def child(argv: list[str]) -> None:
    out_path = argv[0]
    sys.argv = ["diet_jax.main", *argv[1:]]
    from absl import app

    from diet_jax import main as diet_main
    from diet_jax import pipeline
    from diet_jax.data import prepare
    from diet_jax.distill import phase1
    from diet_jax.evaluate import methods, protocol

    ph = _Phases()
    prepare.prepare = ph.wrap(prepare.prepare, lambda *a, **k: "preprocess")
    if os.environ.get("BENCH_READER_ONLY"):
        wrapped_prepare = prepare.prepare

        def prepare_then_stop(*a, **k):
            wrapped_prepare(*a, **k)
            raise SystemExit(0)  # the phases JSON is written by the `finally` below

        prepare.prepare = prepare_then_stop
    pipeline.train_reference = ph.wrap(pipeline.train_reference, lambda *a, **k: "teacher")
    pipeline.distill_driver.distill = ph.wrap(
        pipeline.distill_driver.distill, lambda *a, **k: "phase2"
    )
    if os.environ.get("BENCH_DISTILL_ONLY"):
        wrapped_distill = pipeline.distill_driver.distill

        def distill_then_stop(*a, **k):
            wrapped_distill(*a, **k)
            raise SystemExit(0)

        pipeline.distill_driver.distill = distill_then_stop
    phase1.boundary_memory = ph.wrap(phase1.boundary_memory, lambda *a, **k: "phase1")
    methods.selection_memory = ph.wrap(methods.selection_memory, lambda m, *a, **k: f"select_{m}")
    # methods.run_all trains every (method, candidate) through run_seeds (all seeds at once).
    protocol.run_seeds = ph.wrap(protocol.run_seeds, lambda m, *a, **k: f"candidate_{m}")
    pipeline.report.write_report = ph.wrap(pipeline.report.write_report, lambda *a, **k: "report")
    t0 = time.perf_counter()
    thread = threading.Thread(target=ph.loop, daemon=True)
    thread.start()
    try:
        app.run(diet_main.main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        ph.done = True
        total = time.perf_counter() - t0
        ph.seconds["other"] = total - sum(ph.seconds.values())
        import resource

        with open(out_path, "w") as f:
            json.dump(
                {
                    "seconds": ph.seconds,
                    "peak_rss_kb": {k: v[0] for k, v in ph.peak.items()},
                    "peak_anon_kb": {k: v[1] for k, v in ph.peak.items()},
                    "total_seconds": total,
                    "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                },
                f,
                indent=1,
            )


# ------------------------------------------------------------------ parent


def _fit(rows: list[float], secs: list[float]) -> float:
    import numpy as np

    x, y = np.log(rows), np.log(np.maximum(secs, 1e-3))
    return float(np.polyfit(x, y, 1)[0])


def _affine(rows: list[float], secs: list[float]) -> float:
    """Seconds at 100M lines from the last two sizes' marginal cost (a + b rows): a fixed part
    (compilation, fixed-size phases) does not grow, so this is the better forecast when the
    power-law exponent is below 1 only because of that fixed part."""
    slope = max(secs[-1] - secs[-2], 0.0) / (rows[-1] - rows[-2])
    return secs[-1] + slope * (1e8 - rows[-1])


def run_size(lines: int, root: str, reader_only: bool = False, distill_only: bool = False) -> dict:
    import importlib.util

    sys.path.insert(0, ROOT)
    from diet_jax.data import synthetic_taobao
    from diet_jax.io_utils import atomic_write_json

    spec = importlib.util.spec_from_file_location("cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(None)
    work = os.path.join(root, f"rows_{lines}")
    cfg.data.synth_rows = lines
    cfg.data.data_dir = os.path.join(work, "raw")
    start = time.perf_counter()
    synthetic_taobao.ensure_csv(cfg.data, progress=False)
    gen_s = time.perf_counter() - start
    out = os.path.join(work, "phases_distill.json" if distill_only else "phases.json")
    if distill_only:  # the distillation again, on the stored stages and teacher (if any)
        shutil.rmtree(os.path.join(work, "run", "distill"), ignore_errors=True)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        out,
        f"--config={CONFIG}",
        f"--workdir={os.path.join(work, 'run')}",
        f"--config.data.synth_rows={lines}",
        f"--config.data.data_dir={cfg.data.data_dir}",
        *[f"--config.{k}={v}" for k, v in BENCH_OVERRIDES.items()],
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, DIET_JAX_CACHE=os.path.join(root, "jax_cache"))
    if reader_only:
        env["BENCH_READER_ONLY"] = "1"
    if distill_only:
        env["BENCH_DISTILL_ONLY"] = "1"
    log = os.path.join(work, "log.txt")
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"pipeline at {lines} lines failed (exit {rc}); see {log}")
    phases = json.load(open(out))
    if distill_only:
        phases.update(lines=lines, loadavg=os.getloadavg())
        atomic_write_json(out, phases)
        return phases
    if reader_only:
        fmap = json.load(open(os.path.join(work, "run", "data", "feature_map.json")))
        phases.update(
            lines=lines,
            generate_seconds=gen_s,
            wall_seconds=time.perf_counter() - start,
            samples={s["name"]: s["rows"] for s in fmap.get("stages", [])},
            loadavg=os.getloadavg(),
        )
        atomic_write_json(out, phases)
        return phases
    from diet_jax import results

    res = results.read(os.path.join(work, "run", "results.json"))
    phases.update(
        lines=lines,
        generate_seconds=gen_s,
        wall_seconds=time.perf_counter() - start,
        samples={s["name"]: s["rows"] for s in res.get("stages", [])},
        results=[
            {k: r[k] for k in ("method", "model", "auc", "train_seconds")} for r in res["results"]
        ],
        results_timings=res["timings"],
        loadavg=os.getloadavg(),
    )
    json.dump(phases, open(out, "w"), indent=1)
    return phases


def _phase_names(runs: list[dict]) -> list[str]:
    """The phases of the largest run in the order they ran, `other` last."""
    return [n for n in runs[-1]["seconds"] if n != "other"] + ["other"]


def table(runs: list[dict]) -> str:
    rows = [r["lines"] for r in runs]
    names = _phase_names(runs)
    head = " | ".join(f"{r / 1e6:g}M s" for r in rows)
    lines = [
        f"| phase | {head} | exponent | 100M s (power law) | 100M s (affine) | peak RSS MB | "
        "peak RssAnon MB |",
        "|---|" + "---|" * len(rows) + "---|---|---|---|---|",
    ]
    for n in names:
        secs = [r["seconds"].get(n, 0.0) for r in runs]
        b = _fit(rows, secs)
        ext = secs[-1] * (1e8 / rows[-1]) ** b
        rss = "/".join(f"{r['peak_rss_kb'].get(n, 0) / 1024:.0f}" for r in runs)
        anon = "/".join(f"{r['peak_anon_kb'].get(n, 0) / 1024:.0f}" for r in runs)
        lines.append(
            f"| {n} | " + " | ".join(f"{s:.1f}" for s in secs) + f" | {b:.2f} | {ext:.0f} | "
            f"{_affine(rows, secs):.0f} | {rss} | {anon} |"
        )
    tot = [r["total_seconds"] for r in runs]
    b = _fit(rows, tot)
    lines.append(
        "| **total** | "
        + " | ".join(f"{s:.0f}" for s in tot)
        + f" | {b:.2f} | {tot[-1] * (1e8 / rows[-1]) ** b:.0f} | {_affine(rows, tot):.0f} | "
        + "/".join(f"{max(r['peak_rss_kb'].values()) / 1024:.0f}" for r in runs)
        + " | "
        + "/".join(f"{max(r['peak_anon_kb'].values()) / 1024:.0f}" for r in runs)
        + " |"
    )
    return "\n".join(lines)


# Which kernel of bench_gpu.py each phase's time is mostly spent in (for the accelerator
# forecast); phases not named (the reader, the selections' host work, report, other) are host
# work and keep their CPU seconds.
_PHASE_KERNELS = {
    "teacher": "teacher",
    "phase1": "teacher",
    "phase2": "distill",
    "select_el2n": "teacher",
    "candidate": "teacher",
}


def _kernel_rates(report: dict) -> dict:
    """bench_gpu.py's JSON -> {kernel: work per second} (the table optimizer of the default)."""
    t = report["teacher"]
    opt = "rowwise_adagrad" if "rowwise_adagrad" in t else next(iter(t))
    return {
        "teacher": t[opt]["samples_per_s"],
        "distill": report["distill"]["meta_iterations_per_s"],
    }


def _bench_gpu_json(path: str) -> dict:
    """A bench_gpu.py --json file, checked for what the forecast reads."""
    with open(path) as f:
        report = json.load(f)
    missing = [k for k in ("device", "teacher", "distill") if k not in report]
    if missing or not report["teacher"]:
        raise SystemExit(
            f"{path}: not a bench_gpu.py --json report (missing {missing or 'teacher'})"
        )
    return report


def accelerator_forecast(runs: list[dict], accel: dict, cpu: dict, loader_rate: float = 0.0):
    """{phase: 100M-line seconds on the accelerator}: each phase's affine CPU forecast divided by
    the speed-up of its kernel (bench_gpu.py on the accelerator / on this CPU, same sizes),
    and for phases that stream the store no faster than the host loader (`loader_rate`
    samples/s, 0 = no bound) can feed them. An estimate: compilation, host work inside a phase
    and the accelerator's start-up are charged at the CPU's pace or not at all."""
    rows = [r["lines"] for r in runs]
    ra, rc = _kernel_rates(accel), _kernel_rates(cpu)
    samples_per_line = sum(runs[-1]["samples"].values()) / runs[-1]["lines"]
    out = {}
    for n in _phase_names(runs):
        secs = _affine(rows, [r["seconds"].get(n, 0.0) for r in runs])
        kernel = _PHASE_KERNELS.get("candidate" if n.startswith("candidate_") else n)
        if kernel is None:
            out[n] = secs
            continue
        fast = secs * rc[kernel] / ra[kernel]
        if loader_rate and n in ("teacher", "phase1"):  # one pass over every sample
            fast = max(fast, 1e8 * samples_per_line / loader_rate)
        out[n] = fast
    out["total"] = sum(out.values())
    return out


def distill_memory(root: str, sizes: list[int]) -> None:
    """--distill_only: peak RSS of teacher (restore), phase 1 and phase 2 per size, and the
    growth from the second-largest size to the largest (the issue's bound: within 10%)."""
    runs = [run_size(n, root, distill_only=True) for n in sizes]
    print("| phase | " + " | ".join(f"{n / 1e6:g}M peak RSS / RssAnon MB" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in ("teacher", "phase1", "phase2"):
        cells = [
            f"{r['peak_rss_kb'].get(name, 0) / 1024:.0f} / {r['peak_anon_kb'].get(name, 0) / 1024:.0f}"
            for r in runs
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if len(runs) >= 2:
        a, b = (max(r["peak_rss_kb"].values()) for r in runs[-2:])
        print(
            f"peak RSS {sizes[-2]:,d} -> {sizes[-1]:,d} lines: {a / 1024:.0f} -> "
            f"{b / 1024:.0f} MB ({100 * (b / a - 1):+.1f}%)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/bench_scale")
    p.add_argument("--sizes", default="1e6,4e6,16e6")
    p.add_argument("--table_only", action="store_true", help="only redraw the table")
    p.add_argument("--reader_only", action="store_true", help="the preprocess phase alone")
    p.add_argument(
        "--distill_only",
        action="store_true",
        help="rerun the distillation alone (store and teacher restored) and compare peak RSS",
    )
    p.add_argument(
        "--accelerator_json",
        help="bench_gpu.py --json of an accelerator: add a 100M forecast on it",
    )
    p.add_argument("--cpu_json", help="bench_gpu.py --nosmall --json on this CPU (same sizes)")
    p.add_argument(
        "--loader_samples_per_s",
        type=float,
        default=0.0,
        help="host loader rate (bench_teacher.py --loader_only) bounding one pass",
    )
    args = p.parse_args()
    if bool(args.accelerator_json) != bool(args.cpu_json):
        p.error("--accelerator_json and --cpu_json go together (bench_gpu.py on each device)")
    os.makedirs(args.root, exist_ok=True)
    if args.distill_only:
        distill_memory(args.root, [int(float(x)) for x in args.sizes.split(",")])
        return
    runs = []
    for s in args.sizes.split(","):
        lines = int(float(s))
        path = os.path.join(args.root, f"rows_{lines}", "phases.json")
        if os.path.exists(path) and "lines" in json.load(open(path)):
            runs.append(json.load(open(path)))  # finished earlier: resume
        elif args.table_only:
            continue
        else:
            runs.append(run_size(lines, args.root, args.reader_only))
        r = runs[-1]
        print(
            f"{lines:>10,d} lines: {r['total_seconds']:.0f}s, peak RSS "
            f"{max(r['peak_rss_kb'].values()) / 1024:.0f} MB (anon "
            f"{max(r['peak_anon_kb'].values()) / 1024:.0f} MB), loadavg {r['loadavg']} (shared CPU)",
            flush=True,
        )
    text = table(runs)
    if args.accelerator_json and args.cpu_json and len(runs) >= 2:
        accel, cpu = (_bench_gpu_json(f) for f in (args.accelerator_json, args.cpu_json))
        fc = accelerator_forecast(runs, accel, cpu, args.loader_samples_per_s)
        text += (
            f"\n\n100M lines on {accel['device']} (estimate: affine CPU forecast / "
            "bench_gpu kernel speed-up; host phases at CPU pace"
            + (
                f"; one pass no faster than {args.loader_samples_per_s:,.0f} samples/s"
                if args.loader_samples_per_s
                else ""
            )
            + "):\n\n| phase | s |\n|---|---:|\n"
        )
        text += "\n".join(f"| {n} | {v:.0f} |" for n, v in fc.items())
    print(text)
    json.dump(runs, open(os.path.join(args.root, "bench_scale.json"), "w"), indent=1)
    with open(os.path.join(args.root, "bench_scale.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
