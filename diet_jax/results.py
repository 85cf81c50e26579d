"""results.json: the project's output contract, read by other tools.

    {"dataset": str, "ratio": float, "devices": int,
     "stages": [{"name", "role", "rows"}, ...],
     "results": [{"method", "model", "auc", "logloss", "per_task": {task: {"auc", "logloss"}},
                  "train_seconds", "train_samples"}, ...],
     "fidelity": {...}, "timings": {...}}

Methods: reference (the teacher itself), full_data, cold_start, warmup_start, random, kmeans,
el2n, diet. Models: dcn, dcnv2, finalnet, finalmlp, wukong. A rerun updates entries in place,
keyed by (method, model).
"""

from __future__ import annotations

import os

from diet_jax.io_utils import atomic_write_json, read_json

METHODS = (
    "reference",
    "full_data",
    "cold_start",
    "warmup_start",
    "random",
    "kmeans",
    "el2n",
    "diet",
)
# The methods a candidate is trained under (every method but the teacher itself).
CANDIDATE_METHODS = tuple(m for m in METHODS if m != "reference")
FILENAME = "results.json"


def load_or_new(workdir: str) -> dict:
    path = os.path.join(workdir, FILENAME)
    if os.path.exists(path):
        res = read_json(path)
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


def upsert(res: dict, e: dict) -> None:
    res["results"] = [
        r for r in res["results"] if (r["method"], r["model"]) != (e["method"], e["model"])
    ]
    res["results"].append(e)


def save(workdir: str, res: dict) -> None:
    atomic_write_json(os.path.join(workdir, FILENAME), res)
