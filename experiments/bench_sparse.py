"""Sparse embedding updates: training samples/s per embedding optimizer, and their test AUC.

    python experiments/bench_sparse.py                       # throughput table (any device)
    python experiments/bench_sparse.py --vocabs=100000 --batch_sizes=1024 --min_seconds=5
    python experiments/bench_sparse.py --vocabs=config --batch_sizes=1024 --repeats=3
    python experiments/bench_sparse.py --mode=auc --workdir=/tmp/bench_sparse_auc

`--mode=throughput` builds DCN + MMoE of `config.model` (D=32 by default) over 8 fields x V ids
for every V in `--vocabs` (or the config's own vocabularies), and times the jitted, donating
train step of `train/steps.py` for dense Adam and each row-sparse optimizer at every batch size.
Batches are uniform random ids (the worst case for sparse updates: the most distinct rows per
batch) with random labels, placed on the device before timing, so the figures measure the step. Then, for V = the first vocab, the same
steps run through `loop.train_epoch` over a memory-mapped stage (the training input pipeline):
when both columns agree, the loader keeps the device fed.

`--mode=auc` trains the config's reference model (the teacher, every historical stage) once per
optimizer and seed on the config's stage store and prints validation and test AUC, test LogLoss
and training samples/s (loader included): the evidence for the default
`train.embedding_optimizer`. Nothing here is CPU-specific.
"""

import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data import prepare
from diet_jax.data.store import FeatureMap, Stage, StageInfo
from diet_jax.models import build_model
from diet_jax.train import loop
from diet_jax.train.reference import train_reference
from diet_jax.train.sparse import EMBEDDING_OPTIMIZERS
from diet_jax.train.steps import make_predict_step, make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=False
)
_MODE = flags.DEFINE_enum("mode", "throughput", ["throughput", "auc"], "What to measure.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", list(EMBEDDING_OPTIMIZERS), "Embedding optimizers.")
_VOCABS = flags.DEFINE_list(
    "vocabs",
    ["100000", "1000000"],
    "Ids per field (`--fields` fields), or 'config' for the config's data.vocab_sizes.",
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["512", "1024", "4096"], "Batch sizes.")
_FIELDS = flags.DEFINE_integer("fields", 8, "Number of fields.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 3.0, "Timed seconds per cell (at least).")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 5, "Timed steps per cell (at least).")
_LOADER_STEPS = flags.DEFINE_integer("loader_steps", 100, "Steps of the loader column (0: skip).")
_WORKDIR = flags.DEFINE_string("workdir", None, "--mode=auc: store and teacher runs go here.")
_ADAGRAD_LRS = flags.DEFINE_list(
    "adagrad_lrs", [], "--mode=auc: rowwise_adagrad learning rates (default: the config's)."
)

_SEEDS = flags.DEFINE_list("seeds", ["0"], "--mode=auc: config seeds (init and shuffling).")

_REPEATS = flags.DEFINE_integer("repeats", 1, "Timings per cell, interleaved; the best is kept.")

_NUM_BATCHES = 8  # distinct device batches, cycled


def _random_arrays(rng, rows: int, vocab_sizes: tuple[int, ...], tasks: int) -> dict:
    return {
        "x": rng.integers(0, vocab_sizes, (rows, len(vocab_sizes)), dtype=np.int32),
        "y": (rng.random((rows, tasks)) < 0.3).astype(np.uint8),
        "w": np.ones(rows, np.float32),
    }


def _vocab_rows(config) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for v in _VOCABS.value:
        if v == "config":
            sizes = tuple(config.data.vocab_sizes)
            rows.append((f"config {sum(sizes):,} rows", sizes))
        else:
            rows.append((f"{_FIELDS.value} x {int(v):,}", (int(v),) * _FIELDS.value))
    return rows


def _time_steps(step, state, batches) -> tuple[float, float, object]:
    """(samples per second, samples per host CPU-second, state) of `step` after two warm-up
    steps; at least min_steps and min_seconds. CPU-seconds count every thread of this process,
    so on a shared CPU they barely move with other processes' load; on an accelerator they are
    the host's cost only."""
    for b in batches[:2]:
        state, _ = step(state, b)
    jax.block_until_ready(state)
    n, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while n < _MIN_STEPS.value or time.perf_counter() - start < _MIN_SECONDS.value:
        state, _ = step(state, batches[n % len(batches)])
        n += 1
        if n % 4 == 0:  # bound the dispatch queue so the clock measures finished steps
            jax.block_until_ready(state)
    jax.block_until_ready(state)
    samples = n * batches[0]["x"].shape[0]
    return (
        samples / (time.perf_counter() - start),
        samples / (time.process_time() - cpu_start),
        state,
    )


def throughput(config) -> None:
    tasks, opts = 3, _OPTIMIZERS.value
    print(f"device: {jax.devices()[0].device_kind}; DCN + MMoE, D={config.model.embed_dim}")
    print(
        "training samples/s (step only, batches already on the device; "
        f"best of {_REPEATS.value}; in brackets: x dense_adam)"
    )
    print(f"{'fields x ids':>20} {'batch':>6} " + " ".join(f"{o:>18}" for o in opts))
    rng = np.random.default_rng(0)
    loader_rows, cpu_rows = [], []
    for v_i, (label, vocab_sizes) in enumerate(_vocab_rows(config)):
        fmap = FeatureMap(
            "bench",
            tuple(f"f{i}" for i in range(len(vocab_sizes))),
            vocab_sizes,
            tuple(f"t{k}" for k in range(tasks)),
            (),
        )
        model = build_model(config.model, fmap, name="dcn")
        trainers = {}
        for opt in opts:
            config.train.embedding_optimizer = opt
            trainers[opt] = make_trainer(model, config.train)
        for bs in (int(b) for b in _BATCH_SIZES.value):
            batches = [
                jax.device_put(_random_arrays(rng, bs, vocab_sizes, tasks))
                for _ in range(_NUM_BATCHES)
            ]
            best, best_cpu = dict.fromkeys(opts, 0.0), dict.fromkeys(opts, 0.0)
            for r in range(_REPEATS.value):  # interleaved, so a burst of load hits all alike
                for opt in opts:
                    state = trainers[opt].init(*model.init(jax.random.key(0)))
                    sps, cps, state = _time_steps(trainers[opt].step, state, batches)
                    best[opt], best_cpu[opt] = max(best[opt], sps), max(best_cpu[opt], cps)
                    if v_i == 0 and r == _REPEATS.value - 1 and _LOADER_STEPS.value > 0:
                        lps, lcps = _through_loader(trainers[opt].step, state, rng, bs, vocab_sizes)
                        loader_rows.append((bs, opt, sps, lps, cps, lcps))
                    del state  # free the table before the next optimizer allocates its own
            print(f"{label:>20} {bs:>6} " + _cells(best, opts), flush=True)
            cpu_rows.append(f"{label:>20} {bs:>6} " + _cells(best_cpu, opts))
    print("\ntraining samples per host CPU-second (the same runs; robust to other processes)")
    print(f"{'fields x ids':>20} {'batch':>6} " + " ".join(f"{o:>18}" for o in opts))
    print("\n".join(cpu_rows))
    if loader_rows:
        print(
            "\nthrough the loader (loop.train_epoch over a memory-mapped stage), "
            f"{_vocab_rows(config)[0][0]}"
        )
        print(
            f"{'':>23} {'samples/s':^26} {'samples per CPU-second':^26}\n"
            f"{'batch':>6} {'optimizer':>16} {'step only':>12} {'train_epoch':>13} "
            f"{'step only':>12} {'train_epoch':>13}"
        )
        for bs, opt, sps, lps, cps, lcps in loader_rows:
            print(f"{bs:>6} {opt:>16} {sps:>12,.0f} {lps:>13,.0f} {cps:>12,.0f} {lcps:>13,.0f}")


def _cells(values: dict, opts) -> str:
    dense = values.get("dense_adam")
    cells = [f"{values[o]:,.0f}" + (f" ({values[o] / dense:.1f}x)" if dense else "") for o in opts]
    return " ".join(f"{c:>18}" for c in cells)


def _through_loader(step, state, rng, bs, vocab_sizes, tasks=3) -> tuple[float, float]:
    """(samples/s, samples per CPU-second) of `train_epoch` over a memmapped stage of
    `loader_steps` batches, the step already compiled. The CPU figure includes the loader's
    threads: equal to the step-only one means the loader costs (next to) nothing."""
    rows = bs * _LOADER_STEPS.value
    arrays = _random_arrays(rng, rows, vocab_sizes, tasks)
    with tempfile.TemporaryDirectory() as d:
        for k in ("x", "y"):
            np.save(os.path.join(d, f"{k}.npy"), arrays[k])
        stage = Stage(
            StageInfo("bench", "historical", rows),
            np.load(os.path.join(d, "x.npy"), mmap_mode="r"),
            np.load(os.path.join(d, "y.npy"), mmap_mode="r"),
        )
        cpu_start = time.process_time()
        _, stats = loop.train_epoch(step, state, stage, batch_size=bs, seed=0, progress=False)
        cpu = time.process_time() - cpu_start
    return stats["samples"] / stats["seconds"], stats["samples"] / cpu


def auc(config) -> None:
    workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), "diet_bench_sparse_auc")
    store = prepare.prepare(config, workdir)
    val, test = store.stages("validation")[0], store.stages("test")[0]
    runs = []
    for opt in _OPTIMIZERS.value:
        lrs = _ADAGRAD_LRS.value if opt == "rowwise_adagrad" and _ADAGRAD_LRS.value else [None]
        runs += [(opt, None if lr is None else float(lr)) for lr in lrs]
    print(
        f"device: {jax.devices()[0].device_kind}; teacher {config.teacher.model}, "
        f"{len(store.stages('historical'))} stages, batch {config.train.batch_size}"
    )
    print(
        f"{'optimizer':>16} {'table lr':>9} {'seed':>4} {'val AUC':>8} {'test AUC':>9} "
        f"{'LogLoss':>8} {'samples/s':>10}"
    )
    summary = {}
    for seed in (int(s) for s in _SEEDS.value):  # seeds outermost: load drifts over time
        config.seed = seed
        for opt, lr in runs:
            config.train.embedding_optimizer = opt
            if lr is not None:
                config.train.adagrad_learning_rate = lr
            table_lr = (
                config.train.adagrad_learning_rate
                if opt == "rowwise_adagrad"
                else config.train.learning_rate
            )
            run_dir = os.path.join(workdir, f"teacher_{opt}_{table_lr:g}")
            shutil.rmtree(run_dir, ignore_errors=True)  # always train, never restore
            ref = train_reference(config, store, run_dir)
            predict_step = make_predict_step(ref.model)
            m = {
                name: loop.evaluate(
                    predict_step,
                    ref.final.params,
                    ref.final.model_state,
                    stage,
                    config.train.eval_batch_size,
                    store.feature_map.tasks,
                )
                for name, stage in (("val", val), ("test", test))
            }
            sps = ref.train_samples / ref.train_seconds
            summary.setdefault((opt, table_lr), []).append(
                (m["val"]["auc"], m["test"]["auc"], m["test"]["logloss"], sps)
            )
            print(
                f"{opt:>16} {table_lr:>9g} {seed:>4} {m['val']['auc']:>8.4f} "
                f"{m['test']['auc']:>9.4f} {m['test']['logloss']:>8.4f} {sps:>10,.0f}",
                flush=True,
            )
            shutil.rmtree(run_dir, ignore_errors=True)
    print("mean over seeds")
    for (opt, table_lr), rows in summary.items():
        v, t, ll, sps = np.mean(np.asarray(rows), axis=0)
        print(f"{opt:>16} {table_lr:>9g} {'all':>4} {v:>8.4f} {t:>9.4f} {ll:>8.4f} {sps:>10,.0f}")


def main(_):
    config = _CONFIG.value
    config.progress = False
    if _MODE.value == "throughput":
        throughput(config)
    else:
        auc(config)


if __name__ == "__main__":
    app.run(main)
