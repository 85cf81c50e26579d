"""results.json: the project's output contract, read by other tools.

    {"dataset": str, "ratio": float, "devices": int,
     "stages": [{"name", "role", "rows"}, ...],
     "results": [{"method", "model", "auc", "logloss", "per_task": {task: {"auc", "logloss"}},
                  "train_seconds", "train_samples",
                  # candidates (evaluate.candidates x evaluate.seeds) also carry:
                  "backbone", "auc_std", "logloss_std", "seeds", "per_seed": [...],
                  "historical_seconds", "finetune_seconds"}, ...],
     "fidelity": {...}, "fidelity_ceiling": {...}, "timings": {...}}

"fidelity_ceiling" (evaluate/fidelity.py `noise_ceiling`): Full Data's agreement with itself,
each seed's Kendall tau / Spearman against the mean of the other seeds, and "faithful_kendall"
(`faithful_tau`: {"mean", "interval", "seeds", ...}, the tau a method ranking like Full Data
with its seed noise would reach); {} with one seed.

The file is strict JSON: a value with no finite number (a ratio with no historical phase, a
diverged rate's AUC) is written as null; `read` (and `load_or_new`) give it back as NaN.

Methods: reference (the teacher itself), full_data, cold_start, warmup_start, warm_full_data,
random, kmeans, el2n, diet (warm_full_data is run on demand only: `defaults.DEFAULT_METHODS`).
"model" is the candidate's name (the base candidates are named after their backbones: dcn,
dcnv2, finalnet, finalmlp, wukong). A rerun updates entries in place, keyed by (method,
model); "auc" and the other metrics are means over the entry's seeds.
"""

from __future__ import annotations

import copy
import os

import numpy as np

from diet_jax.io_utils import atomic_write_json, read_json

METHODS = (
    "reference",
    "full_data",
    "cold_start",
    "warmup_start",
    "warm_full_data",
    "random",
    "kmeans",
    "el2n",
    "diet",
)
# The methods a candidate is trained under (every method but the teacher itself).
CANDIDATE_METHODS = tuple(m for m in METHODS if m != "reference")
FILENAME = "results.json"


def read(path: str) -> dict:
    """A results.json as the run held it: every null (a non-finite float when written, or a
    rate not fine-tuned) back as NaN, so numeric code reads it as it did the run's own values."""
    return _null_to_nan(read_json(path))


def _null_to_nan(x):
    if x is None:
        return float("nan")
    if isinstance(x, dict):
        return {k: _null_to_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_null_to_nan(v) for v in x]
    return x


def load_or_new(workdir: str) -> dict:
    path = os.path.join(workdir, FILENAME)
    if os.path.exists(path):
        res = read(path)
        res.setdefault("results", [])
        res.setdefault("fidelity", {})
        res.setdefault("timings", {})
        return res
    return {
        "dataset": "",
        "ratio": 0.0,
        "devices": 1,
        "stages": [],
        "results": [],
        "fidelity": {},
        "timings": {},
    }


def describe(res: dict, config, feature_map, devices: int) -> None:
    res["dataset"] = feature_map.dataset
    res["ratio"] = float(config.ratio)
    res["devices"] = int(devices)
    res["stages"] = [{"name": s.name, "role": s.role, "rows": s.rows} for s in feature_map.stages]
    if "oracle" in feature_map.extra:
        res["oracle"] = feature_map.extra["oracle"]


def entry(method: str, model: str, m: dict, train_seconds: float, train_samples: int) -> dict:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
    return {
        "method": method,
        "model": model,
        "auc": float(m["auc"]),
        "logloss": float(m["logloss"]),
        "per_task": m["per_task"],
        "train_seconds": float(train_seconds),
        "train_samples": int(train_samples),
    }


def seed_entry(method: str, model: str, backbone: str, per_seed: list[dict]) -> dict:
    """One (method, candidate) entry from its per-seed runs: means, plus "auc_std", "seeds",
    "per_seed" [{"seed", "auc", "logloss", "train_seconds", "train_samples", ...}].

    Every `entry` key keeps its meaning, as the mean over seeds ("auc", "logloss", "per_task",
    "train_seconds"); standard deviations use ddof=1 (0.0 for one seed).
    """
    if not per_seed:
        raise ValueError(f"No seeds for {method}/{model}.")

    def stats(values):
        v = np.asarray(values, np.float64)
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

    tasks = list(per_seed[0]["per_task"])
    per_task = {
        t: {k: stats([p["per_task"][t][k] for p in per_seed])[0] for k in ("auc", "logloss")}
        for t in tasks
    }
    mean_metrics = {
        "auc": stats([p["auc"] for p in per_seed])[0],
        "logloss": stats([p["logloss"] for p in per_seed])[0],
        "per_task": per_task,
    }
    e = entry(
        method,
        model,
        mean_metrics,
        stats([p["train_seconds"] for p in per_seed])[0],
        int(round(stats([p["train_samples"] for p in per_seed])[0])),
    )
    e["backbone"] = backbone
    e["auc_std"] = stats([p["auc"] for p in per_seed])[1]
    e["logloss_std"] = stats([p["logloss"] for p in per_seed])[1]
    e["train_seconds_std"] = stats([p["train_seconds"] for p in per_seed])[1]
    for key in ("historical_seconds", "finetune_seconds", "historical_epochs"):
        if all(key in p for p in per_seed):
            e[key] = stats([p[key] for p in per_seed])[0]
    e["seeds"] = [int(p["seed"]) for p in per_seed]
    e["per_seed"] = per_seed
    return e


def merge_replicates(runs: list[dict]) -> dict:
    """One results dict from replicate runs of one config with other `seed`s (each its own
    teacher, distillation and candidate seeds): every (method, candidate) entry present in all
    runs, rebuilt by `seed_entry` over the seeds of all runs; the rest of the first run. A seed
    in two runs is an error (it would count one training twice). `fidelity` is left empty:
    recompute it over the merged entries (evaluate.fidelity.fidelity_table).
    """
    if not runs:
        raise ValueError("No runs to merge.")
    keyed = [{(r["method"], r["model"]): r for r in run["results"]} for run in runs]
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    merged = []
    for key in common:
        parts = [run[key] for run in keyed]
        if key[0] == "reference" or any("per_seed" not in p for p in parts):
            continue
        per_seed = [p for part in parts for p in part["per_seed"]]
        seeds = [int(p["seed"]) for p in per_seed]
        if len(set(seeds)) < len(seeds):
            raise ValueError(
                f"{key[0]}/{key[1]}: seeds {seeds} repeat across the runs; replicates need "
                "different config.seed values."
            )
        merged.append(seed_entry(key[0], key[1], parts[0].get("backbone", key[1]), per_seed))
    out = {k: v for k, v in runs[0].items() if k not in ("results", "fidelity")}
    out["results"], out["fidelity"] = merged, {}
    return out


def fill_from(res: dict, base: dict) -> dict:
    """`res` with the (method, model) entries (and their candidate_info) it lacks taken from
    `base`: a variant rerun of a copy of run `base` that recomputed some methods only. Its
    `fidelity` is then stale: recompute it over the filled entries (fidelity.fidelity_table)."""
    res = copy.deepcopy(res)
    own = {(r["method"], r["model"]) for r in res["results"]}
    res["results"] += [r for r in base["results"] if (r["method"], r["model"]) not in own]
    info = res.setdefault("candidate_info", {})
    for key, runs in base.get("candidate_info", {}).items():
        info.setdefault(key, runs)
    return res


def read_filled(workdir: str, base: str | None = None) -> dict:
    """`workdir`'s results.json, with the entries it lacks from run `base`'s when one is given."""
    res = read(os.path.join(workdir, FILENAME))
    return fill_from(res, read(os.path.join(base, FILENAME))) if base else res


def upsert(res: dict, e: dict) -> None:
    res["results"] = [
        r for r in res["results"] if (r["method"], r["model"]) != (e["method"], e["model"])
    ]
    res["results"].append(e)


def save(workdir: str, res: dict) -> None:
    atomic_write_json(os.path.join(workdir, FILENAME), res)
