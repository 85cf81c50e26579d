"""Model zoo throughput: samples/s of a train step and of inference, and parameter counts.

    python experiments/bench_models.py --config=configs/synthetic.py
    python experiments/bench_models.py --config=configs/synthetic.py --models=dcn,wukong \\
        --batch_sizes=512,1024,4096 --steps=20 --json_out=/tmp/bench_models.json
    python experiments/bench_models.py --config=configs/synthetic.py --vmapped --groups=6,18

`--vmapped`: the reduced-data candidate training of `train/group.py`: G dense networks of one
architecture (each its own init and learning rate) trained on `--rows` in-memory (embedding,
logit) rows at evaluate.rows_batch_size, one epoch per call, as one vmapped jitted group against
the same G networks one after another (same jitted epoch, unvmapped), and against those epochs
on one host thread per core (the other way to use a multi-core CPU, which the protocol does not
take: docs/evaluation.md, "Members on threads"). Reports samples x models per second of each
and their ratios to one after another; compile and a first call are excluded from all three. It
also prints the ceiling of any batching: the FLOP/s that one member's epoch reaches alone (FLOPs
from XLA's cost analysis of one step, times the steps) against the FLOP/s of a large square f32
matmul on the same device. Where a member alone already runs near that rate (a compute-bound
CPU), no vmapping can be faster by more than their ratio.

Every model is the full recommender (embedding table + backbone + shared MMoE head) of
`config.model`. The train step is the jitted, donating step that `train/steps.py`'s
`make_trainer` builds from the config (the table updated by `train.embedding_optimizer`, as the
teacher and every candidate train; `--config.train.embedding_optimizer=dense_adam` times optax
over the whole table); inference is the jitted eval-mode forward pass. Batches are uniform random ids
inside each field's vocabulary with random labels, placed on the device before timing, so the
figures measure the model, not the loader (bench_teacher.py times the loader too). Runs on any
device JAX finds; nothing in it is CPU-specific.
"""

import functools
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data.store import FeatureMap
from diet_jax.models import BACKBONES, build_model
from diet_jax.train.steps import make_predict_step, make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_MODELS = flags.DEFINE_list("models", list(BACKBONES), "Backbones to time.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["512", "1024", "4096"], "Batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per (model, batch size, mode).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Stage store location, used only when config.data has no vocab_sizes."
)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")

_VMAPPED = flags.DEFINE_bool("vmapped", False, "Time vmapped candidate groups on rows.")
_GROUPS = flags.DEFINE_list("groups", ["6", "12", "18"], "--vmapped: group sizes G.")
_ROWS = flags.DEFINE_integer("rows", 4500, "--vmapped: rows per epoch (the default memory).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "--vmapped: timed epochs per measurement.")

_NUM_BATCHES = 4  # distinct device batches, cycled


def feature_map_of(config) -> FeatureMap:
    """The synthetic config describes its fields; any other dataset reads its prepared store."""
    d = config.data
    if "vocab_sizes" in d and "tasks" in d:
        return FeatureMap(
            dataset=d.get("source", "config"),
            fields=tuple(d.field_names),
            vocab_sizes=tuple(d.vocab_sizes),
            tasks=tuple(d.tasks),
            stages=(),
        )
    from diet_jax.data import prepare

    workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), "diet_bench_models")
    return prepare.prepare(config, workdir).feature_map


def random_batches(fmap: FeatureMap, batch_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(_NUM_BATCHES):
        x = np.stack([rng.integers(0, v, batch_size) for v in fmap.vocab_sizes], 1)
        y = rng.integers(0, 2, (batch_size, fmap.num_tasks))
        batch = {
            "x": x.astype(np.int32),
            "y": y.astype(np.uint8),
            "w": np.ones(batch_size, np.float32),
        }
        out.append(jax.device_put(batch))
    return out


def time_calls(fn, n_warmup: int, n_steps: int) -> float:
    """Seconds for n_steps calls of fn(i) after n_warmup untimed ones; fn returns arrays."""
    for i in range(n_warmup):
        jax.block_until_ready(fn(i))
    start = time.perf_counter()
    out = None
    for i in range(n_steps):
        out = fn(i)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def bench_model(config, fmap: FeatureMap, name: str, batch_sizes: list[int]) -> list[dict]:
    model = build_model(config.model, fmap, name)
    trainer = make_trainer(model, config.train)
    params, model_state = model.init(jax.random.key(config.seed))
    n_dense = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params["dense"]))
    n_embed = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params["embed"]))
    train_step = trainer.step
    predict_step = make_predict_step(model)
    rows = []
    for bs in batch_sizes:
        batches = random_batches(fmap, bs)
        # Copies: the train step donates its state, and inference keeps using the originals.
        fresh = jax.tree.map(jnp.array, (params, model_state))
        box = {"state": trainer.init(*fresh)}

        def train(i, box=box, batches=batches):
            box["state"], m = train_step(box["state"], batches[i % _NUM_BATCHES])
            return m["loss"]

        def infer(i, batches=batches):
            return predict_step(params, model_state, batches[i % _NUM_BATCHES]["x"])

        t_train = time_calls(train, _WARMUP.value, _STEPS.value)
        t_infer = time_calls(infer, _WARMUP.value, _STEPS.value)
        rows.append(
            {
                "model": name,
                "batch_size": bs,
                "dense_params": n_dense,
                "embed_params": n_embed,
                "train_samples_per_s": _STEPS.value * bs / t_train,
                "train_ms_per_step": 1e3 * t_train / _STEPS.value,
                "infer_samples_per_s": _STEPS.value * bs / t_infer,
                "infer_ms_per_step": 1e3 * t_infer / _STEPS.value,
            }
        )
        r = rows[-1]
        print(
            f"{name:9s} bs {bs:5d}  train {r['train_samples_per_s']:>10,.0f}/s "
            f"({r['train_ms_per_step']:.1f} ms)  infer {r['infer_samples_per_s']:>10,.0f}/s "
            f"({r['infer_ms_per_step']:.1f} ms)",
            flush=True,
        )
    return rows


def matmul_flops_per_s(n: int = 1024, calls: int = 20) -> float:
    """FLOP/s of a jitted n x n x n f32 matmul: what dense compute on this device can reach."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ a)
    return calls * 2 * n**3 / time_calls(lambda i: f(a), 2, calls)


def step_flops(fns, member, lr, e, logits, batch_size: int) -> float | None:
    """XLA's FLOP count of one training step of one member (an epoch of one batch: the cost
    analysis of a scan need not multiply its body by the trip count)."""
    order = jnp.arange(batch_size, dtype=jnp.int32)
    compiled = fns.epoch.lower(*member, lr, e, logits, order).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_group(config, fmap: FeatureMap, name: str, sizes: list[int]) -> list[dict]:
    """Samples x models / s of G members trained as one vmapped group vs one after another."""
    from diet_jax.train import group

    model = build_model(config.model, fmap, name)
    n, bs = _ROWS.value, config.evaluate.rows_batch_size
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.normal(0, 0.05, (n, fmap.num_fields, config.model.embed_dim)), jnp.float32)
    logits = jnp.asarray(rng.normal(-1, 1, (n, fmap.num_tasks)), jnp.float32)
    clip = float(config.train.max_grad_norm)
    rows = []
    for g in sizes:
        inits = [model.init_dense(jax.random.key(i)) for i in range(g)]
        lrs = [jnp.float32(1e-3 * (1 + i % 6)) for i in range(g)]
        orders = [
            jnp.asarray(group.padded_order(n, bs, np.random.default_rng(i))) for i in range(g)
        ]
        seq = group.make_group_fns(model, bs, clip, True, False)
        vm = group.make_group_fns(model, bs, clip, True, True)
        members = [(p, s, seq.tx.init(p)) for p, s in inits]
        p_G = group.stack([m[0] for m in members])
        s_G = group.stack([m[1] for m in members])
        o_G = group.stack([m[2] for m in members])
        lr_G, order_G = jnp.stack(lrs), jnp.stack(orders)

        seq_calls = [
            functools.partial(seq.epoch, *m, lrs[i], e, logits, orders[i])
            for i, m in enumerate(members)
        ]
        vm_call = functools.partial(vm.epoch, p_G, s_G, o_G, lr_G, e, logits, order_G)
        t_seq = time_calls(lambda i, calls=seq_calls: [c() for c in calls], 1, _EPOCHS.value)
        t_vm = time_calls(lambda i, call=vm_call: call(), 1, _EPOCHS.value)
        # The members on host threads: the same unvmapped epochs, each finished on its thread
        # (the GIL is released while a jitted call runs), one thread per core.
        workers = min(g, len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(workers) as ex:

            def threaded(i, calls=seq_calls, ex=ex):
                return list(ex.map(lambda c: jax.block_until_ready(c()), calls))

            t_thr = time_calls(threaded, 1, _EPOCHS.value)
        work = _EPOCHS.value * n * g
        flops = step_flops(seq, members[0], lrs[0], e, logits, bs)
        steps = _EPOCHS.value * g * (orders[0].shape[0] // bs)
        seq_flops_per_s = flops * steps / t_seq if flops else None
        rows.append(
            {
                "model": name,
                "group": g,
                "rows": n,
                "batch_size": bs,
                "sequential_samples_models_per_s": work / t_seq,
                "vmapped_samples_models_per_s": work / t_vm,
                "speedup": t_seq / t_vm,
                "threads": workers,
                "threaded_samples_models_per_s": work / t_thr,
                "threaded_speedup": t_seq / t_thr,
                "step_flops": flops,
                "sequential_flops_per_s": seq_flops_per_s,
            }
        )
        r = rows[-1]
        print(
            f"{name:9s} G {g:3d}  sequential {r['sequential_samples_models_per_s']:>11,.0f}  "
            f"vmapped {r['vmapped_samples_models_per_s']:>11,.0f} samples x models/s  "
            f"speed-up {r['speedup']:.2f}x  threads x{workers} "
            f"{r['threaded_samples_models_per_s']:>11,.0f} ({r['threaded_speedup']:.2f}x)  "
            f"(load {os.getloadavg()[0]:.1f}, shared CPU)",
            flush=True,
        )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    config = _CONFIG.value
    unknown = [m for m in _MODELS.value if m not in BACKBONES]
    if unknown:
        raise ValueError(f"Unknown models {unknown}; available: {', '.join(BACKBONES)}.")
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    if any(b <= 0 for b in batch_sizes):
        raise ValueError(f"Batch sizes must be positive, got {batch_sizes}.")
    fmap = feature_map_of(config)
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}  fields: "
        f"{fmap.num_fields}  embed_dim: {config.model.embed_dim}  tasks: {fmap.num_tasks}  "
        f"steps: {_STEPS.value}  embedding optimizer: "
        f"{config.train.get('embedding_optimizer', 'dense_adam')}  load: {os.getloadavg()[0]:.1f}"
    )
    rows = []
    if _VMAPPED.value:
        sizes = [int(g) for g in _GROUPS.value]
        for name in _MODELS.value:
            rows += bench_group(config, fmap, name, sizes)
        peak = matmul_flops_per_s()
        print(
            "\n| model | G | sequential | vmapped | speed-up | threads | speed-up | sequential "
            "GFLOP/s | of matmul rate |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for r in rows:
            r["matmul_flops_per_s"] = peak
            f = r["sequential_flops_per_s"]
            frac = f"{f / peak:.0%}" if f else "n/a"
            print(
                f"| {r['model']} | {r['group']} | {r['sequential_samples_models_per_s']:,.0f} | "
                f"{r['vmapped_samples_models_per_s']:,.0f} | {r['speedup']:.2f}x | "
                f"{r['threaded_samples_models_per_s']:,.0f} (x{r['threads']}) | "
                f"{r['threaded_speedup']:.2f}x | {f / 1e9 if f else float('nan'):.1f} | {frac} |"
            )
        print(
            f"(samples x models / s, rows {_ROWS.value}; a 1024^3 f32 matmul runs at "
            f"{peak / 1e9:.1f} GFLOP/s here; load {os.getloadavg()})"
        )
        _write_json(dev, rows)
        return
    for name in _MODELS.value:
        rows += bench_model(config, fmap, name, batch_sizes)

    print(
        "\n| model | dense params | "
        + " | ".join(f"train/s @{b}" for b in batch_sizes)
        + " | "
        + " | ".join(f"infer/s @{b}" for b in batch_sizes)
        + " |"
    )
    print("|---|---:|" + "---:|" * (2 * len(batch_sizes)))
    for name in _MODELS.value:
        mine = [r for r in rows if r["model"] == name]
        cells = [f"{r['train_samples_per_s']:,.0f}" for r in mine]
        cells += [f"{r['infer_samples_per_s']:,.0f}" for r in mine]
        print(f"| {name} | {mine[0]['dense_params']:,} | " + " | ".join(cells) + " |")
    print(f"(embedding table: {rows[0]['embed_params']:,} parameters, shared by every model)")
    _write_json(dev, rows)


def _write_json(dev, rows) -> None:
    if _JSON_OUT.value:
        tmp = _JSON_OUT.value + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"device": f"{dev.platform} {dev.device_kind}", "rows": rows}, f, indent=1)
        os.replace(tmp, _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
