"""Study harness: DIET variants against Random Selection, scored on the VALIDATION day.

    nice -n 10 python experiments/study_harness.py --root=/tmp/study/h \
        --set=distill.outer_iterations=100 --name=it100 --models=dcn,finalnet --seeds=0,1

One shared stage store and teacher under `<root>/shared` (built once), so a variant costs its
distillation plus its candidates. For every seed s: DIET distils with `seed = s` (its RNG, real
minibatch order), Random Selection draws its rows with `seed = s`, and each candidate (fresh
dense network on the rows, the final teacher's embedding table) trains with seed s through
`protocol.train_on_rows` (up to `evaluate.max_epochs`, best epoch by validation AUC). With
`--finetune` the candidate is then fine-tuned one epoch on the subsequent block
(`protocol.finetune_and_test`, pointed at the validation day), i.e. the paper's protocol with
validation in place of test. The test day is never read.

Random is scored twice: `random` (the evaluation's baseline, n_t rows per historical stage) and
`random_same` (a uniform subset of it with as many rows as DIET's memory, when smaller).
Results are cached in `<root>/scores.jsonl` by (variant, method, model, seed, finetune), so a
rerun only computes what is missing. `summary()` gives mean and std over seeds of the
validation AUC and of the paired difference DIET - Random.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from diet_jax import io_utils
from diet_jax.data import prepare
from diet_jax.distill import driver
from diet_jax.distill import memory as memory_lib
from diet_jax.evaluate import methods, protocol, sweep
from diet_jax.models import BACKBONES, build_model
from diet_jax.train.reference import train_reference

io_utils.enable_compilation_cache()


@dataclasses.dataclass
class Shared:
    config: object  # the base config, store_dir and teacher dir pointed at <root>/shared
    root: str
    store: object
    ref: object


def setup(config, root: str, lr: float = 0.0) -> Shared:
    """The stage store and teacher under <root>/shared (trained once, restored afterwards)."""
    cfg = config.copy_and_resolve_references()
    cfg.progress = False
    if lr:
        cfg.evaluate.learning_rate = lr  # candidates' Adam step on the rows
    shared = os.path.join(root, "shared")
    cfg.data.store_dir = cfg.data.store_dir or os.path.join(shared, "data")
    cfg.teacher.checkpoint_dir = cfg.teacher.checkpoint_dir or os.path.join(shared, "teacher")
    os.makedirs(shared, exist_ok=True)
    store = prepare.prepare(cfg, shared)
    ref = train_reference(cfg, store, shared)
    return Shared(cfg, root, store, ref)


def variant_config(sh: Shared, overrides: dict | None, seed: int):
    cfg = sh.config.copy_and_resolve_references()
    for path, value in (overrides or {}).items():
        sweep.set_path(cfg, path, value)
    cfg.seed = seed  # distillation RNG and real-batch order; the teacher is shared
    return cfg


def diet_memory(sh: Shared, name: str, overrides: dict | None, seed: int):
    """D_syn^T of the variant (distilled once, then read back) and its distillation info."""
    cfg = variant_config(sh, overrides, seed)
    workdir = os.path.join(sh.root, "variants", name, f"seed{seed}")
    info_path = os.path.join(workdir, "distill_info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return driver.load_final(workdir), json.load(f)
    start = time.perf_counter()
    run = driver.distill(cfg, sh.store, sh.ref, workdir)
    info = {"seconds": time.perf_counter() - start, "stages": run.stages, "rows": len(run.final)}
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, default=float)
    os.replace(info_path + ".tmp", info_path)
    return run.final, info


def random_memory(sh: Shared, seed: int):
    """Random Selection's rows (n_t per historical stage, as the evaluation draws them)."""
    path = os.path.join(sh.root, "random", f"seed{seed}")
    if memory_lib.exists(path):
        return memory_lib.load(path)
    cfg = variant_config(sh, None, seed)
    mem = methods.selection_memory("random", cfg, sh.store, sh.ref)
    memory_lib.save(path, mem)
    return mem


def subsample(mem, n: int, seed: int):
    if n >= len(mem):
        return mem
    idx = np.sort(np.random.default_rng(10_000 + seed).choice(len(mem), n, replace=False))
    return memory_lib.take(mem, idx)


def score_rows(sh: Shared, rows: dict, model_name: str, seed: int, finetune: bool) -> dict:
    """Validation AUC of a candidate trained on `rows` (and optionally fine-tuned)."""
    config = sh.config
    model = build_model(config.model, sh.store.feature_map, name=model_name)
    embed = sh.ref.final.params["embed"]
    start = time.perf_counter()
    params_dense, state, info, _, _ = protocol.train_on_rows(
        model, embed, rows, sh.store, config, seed
    )
    out = {"val_auc_rows": float(max(info["val_auc_per_epoch"])), "best_epoch": info["best_epoch"]}
    if finetune:
        # The protocol's fine-tune on the subsequent block, evaluated on the validation day.
        fmap = sh.store.feature_map
        subsequent = [s.name for s in fmap.stages_with_role("subsequent")]
        val_store = ValidationAsTest(sh.store)
        params = {"embed": embed, "dense": params_dense}
        m, _, _ = protocol.finetune_and_test(
            model,
            params,
            state,
            val_store,
            config,
            seed,
            subsequent,
            embed_opt=protocol.inherited_embed_opt(sh.ref.final, config),
        )
        out["val_auc_ft"] = float(m["auc"])
    out["seconds"] = time.perf_counter() - start
    return out


class ValidationAsTest:
    """A StageStore view whose "test" role is the validation day: the fine-tuned candidate is
    scored on validation and the test day is never read."""

    def __init__(self, store):
        self._store = store
        self.feature_map = store.feature_map

    def stage(self, name):
        return self._store.stage(name)

    def stages(self, role):
        return self._store.stages("validation" if role == "test" else role)


def _cache(root):
    path = os.path.join(root, "scores.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return path, rows


def _key(r):
    return (r["variant"], r["method"], r["model"], r["seed"], r["finetune"])


def run_variant(
    sh: Shared,
    name: str,
    overrides: dict | None,
    models,
    seeds,
    finetune: bool = False,
    with_random: bool = True,
    same_size: bool = True,
) -> list[dict]:
    """Scores DIET under `overrides` (and Random) for every model x seed; cached."""
    path, cached = _cache(sh.root)
    have = {_key(r): r for r in cached}
    out = []
    for seed in seeds:
        mem, dinfo = diet_memory(sh, name, overrides, seed)
        todo = [("diet", name, mem)]
        if with_random:
            rnd = random_memory(sh, seed)
            todo.append(("random", "random", rnd))
            if same_size and len(mem) < len(rnd):
                todo.append(("random_same", f"random_n{len(mem)}", subsample(rnd, len(mem), seed)))
        for method, variant, m in todo:
            for model_name in models:
                k = (variant, method, model_name, seed, finetune)
                if k in have:
                    out.append(have[k])
                    continue
                r = score_rows(sh, m.trainable(), model_name, seed, finetune)
                r.update(variant=variant, method=method, model=model_name, seed=seed)
                r.update(finetune=finetune, rows=len(m), overrides=overrides or {})
                if method == "diet":
                    r["distill_seconds"] = dinfo["seconds"]
                with open(path, "a") as f:
                    f.write(json.dumps(r, default=float) + "\n")
                have[k] = r
                out.append(r)
                print(
                    f"  {variant:28s} {method:12s} {model_name:9s} seed {seed} rows {len(m):5d} "
                    f"val AUC {r['val_auc_rows']:.4f}"
                    + (f" ft {r['val_auc_ft']:.4f}" if finetune else "")
                    + f" ({r['seconds']:.0f}s, load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    return out


def summary(rows: list[dict], variant: str, key: str = "val_auc_rows") -> dict:
    """Per model: DIET mean/std, Random mean/std, paired diff mean/std; plus the model mean."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["model"]), {})[r["seed"]] = r[key]
    models = sorted({m for (_, m) in by})
    res = {}
    for mo in models:
        d = by.get(("diet", mo), {})
        rnd = by.get(("random", mo), {})
        same = by.get(("random_same", mo), {})
        seeds = sorted(set(d) & set(rnd))
        diff = [d[s] - rnd[s] for s in seeds]
        res[mo] = {
            "diet": (np.mean(list(d.values())), np.std(list(d.values()))),
            "random": (np.mean(list(rnd.values())), np.std(list(rnd.values()))) if rnd else None,
            "random_same": (np.mean(list(same.values())), np.std(list(same.values())))
            if same
            else None,
            "diff": (np.mean(diff), np.std(diff)) if diff else None,
            "n": len(d),
        }
    return res


def format_summary(name: str, s: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x[0]:.4f} ± {x[1]:.4f}"

    lines = [
        f"### {name}",
        "| model | DIET | Random | Random (same rows) | DIET - Random (paired) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for mo, v in s.items():
        diff = "-" if v["diff"] is None else f"{v['diff'][0]:+.4f} ± {v['diff'][1]:.4f}"
        lines.append(
            f"| {mo} | {ms(v['diet'])} | {ms(v['random'])} | {ms(v['random_same'])} | {diff} "
            f"| {v['n']} |"
        )
    diffs = [v["diff"][0] for v in s.values() if v["diff"] is not None]
    if diffs:
        lines.append(
            f"| mean | | | | {np.mean(diffs):+.4f} (wins {sum(d > 0 for d in diffs)}"
            f"/{len(diffs)}) | |"
        )
    return "\n".join(lines)


def parse_set(items) -> dict:
    """["a.b=3", "c.d=True"] -> {"a.b": 3, "c.d": True} (Python literals, else strings)."""
    import ast

    out = {}
    for item in items or []:
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def main(_):
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    sh = setup(_CONFIG.value, f.root)
    overrides = parse_set(f.set)
    rows = run_variant(
        sh,
        f.name,
        overrides,
        f.models.split(","),
        [int(s) for s in f.seeds.split(",")],
        finetune=f.finetune,
    )
    key = "val_auc_ft" if f.finetune else "val_auc_rows"
    print(format_summary(f"{f.name} {overrides} ({key})", summary(rows, f.name, key)))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/synthetic.py", "Config file.", lock_config=True
    )
    flags.DEFINE_string("root", "/tmp/study/h", "Harness root (shared teacher, caches).")
    flags.DEFINE_string("name", "default", "Variant name (its cache key).")
    flags.DEFINE_multi_string("set", [], "Config overrides, key=value.")
    flags.DEFINE_string("models", ",".join(BACKBONES), "Candidate backbones.")
    flags.DEFINE_string("seeds", "0,1", "Seeds.")
    flags.DEFINE_bool("finetune", False, "Fine-tune on the subsequent block, then validate.")
    app.run(main)
