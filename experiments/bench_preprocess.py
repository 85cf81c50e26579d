"""Taobao preprocessing throughput and peak memory on a generated UserBehavior.csv.

    python experiments/bench_preprocess.py                      # 10M rows
    python experiments/bench_preprocess.py --rows=2000000,10000000 --json_out=/tmp/bench_pre.json

Writes a Taobao-format file (no header, `user,item,category,behaviour,unix seconds`) of `--rows`
rows in a temporary folder, with the real file's mix (about 90% pv; 0.06% of rows outside the
nine days: negative times, 2037, 11/24) and repeated (user, item, day) groups, then runs
`taobao.build` with `configs/taobao.py` in a fresh process and reports raw rows per second and
that process's peak resident memory (ru_maxrss), next to the size of the output arrays it
writes. Everything is deleted afterwards. Peak memory should stay near the fixed chunk and
partition sizes plus the output, whatever the number of rows.
"""

import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import polars as pl
from absl import app, flags

_ROWS = flags.DEFINE_list("rows", ["10000000"], "Raw rows of the generated file(s).")
_CHUNK_MB = flags.DEFINE_integer("chunk_mb", 16, "data.chunk_bytes, in MiB.")
_PARTITION_MB = flags.DEFINE_integer("partition_mb", 64, "data.partition_bytes, in MiB.")
_TMP = flags.DEFINE_string("tmp", None, "Folder for the file and the store (default: system temp).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")

_START, _END = 1511539200, 1512316800  # 2017-11-25 and 2017-12-04, 00:00 UTC+8


def generate(path: str, rows: int, seed: int = 0, chunk: int = 1_000_000) -> None:
    """Writes `rows` Taobao-format rows to `path`, chunk by chunk (bounded memory)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(rows // 101, 10), max(rows // 24, 100)  # the real file's ratios
    with open(path, "wb") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            n_base = int(n * 0.7)
            user = rng.integers(1, n_users + 1, n_base)
            item = np.minimum(rng.zipf(1.3, n_base), n_items)
            item = (item * 2654435761) % n_items + 1  # spread the popular ids
            ts = rng.integers(_START, _END, n_base)
            # Follow-up events on the same (user, item) within the hour: groups of several rows.
            k = rng.integers(0, n_base, n - n_base)
            user, item = np.concatenate([user, user[k]]), np.concatenate([item, item[k]])
            ts = np.concatenate([ts, ts[k] + rng.integers(0, 3600, n - n_base)])
            behaviour = np.zeros(n, np.int8)
            behaviour[n_base:] = rng.choice(4, n - n_base, p=[0.65, 0.07, 0.18, 0.10])
            odd = rng.random(n) < 0.000555
            ts[odd] = rng.choice([-2134949234, 2122867355, _START - 3600], odd.sum())
            pl.DataFrame(
                {
                    "user": user,
                    "item": item,
                    "category": item % 9439 + 1,
                    "behaviour": np.array(["pv", "buy", "cart", "fav"])[behaviour],
                    "ts": ts,
                }
            ).write_csv(f, include_header=False)


def _preprocess(data_dir: str, root: str, chunk_mb: int, partition_mb: int, out) -> None:
    """Runs in a fresh process, so its ru_maxrss is the preprocessing's alone."""
    import importlib.util

    from diet_jax.data import taobao

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "taobao_config", os.path.join(here, "..", "configs", "taobao.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config().data
    cfg.data_dir, cfg.chunk_bytes, cfg.partition_bytes = (
        data_dir,
        chunk_mb << 20,
        partition_mb << 20,
    )
    t0 = time.perf_counter()
    fmap = taobao.build(cfg, root, progress=False)
    seconds = time.perf_counter() - t0
    out.put(
        {
            "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_imports_mib": rss_start / 1024,
            "rows_read": fmap.extra["rows_read"],
            "rows_outside_stages": fmap.extra["rows_outside_stages"],
            "samples": sum(s.rows for s in fmap.stages),
            "vocab_sizes": list(fmap.vocab_sizes),
        }
    )


def main(argv):
    del argv
    results = []
    for rows in (int(r) for r in _ROWS.value):
        tmp = tempfile.mkdtemp(prefix="bench_preprocess_", dir=_TMP.value)
        try:
            data_dir = os.path.join(tmp, "raw")
            os.makedirs(data_dir)
            path = os.path.join(data_dir, "UserBehavior.csv")
            t0 = time.perf_counter()
            generate(path, rows)
            gen_seconds = time.perf_counter() - t0
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_preprocess,
                args=(
                    data_dir,
                    os.path.join(tmp, "store"),
                    _CHUNK_MB.value,
                    _PARTITION_MB.value,
                    queue,
                ),
            )
            proc.start()
            r = queue.get()
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"preprocessing failed with exit code {proc.exitcode}")
            r.update(
                rows=rows,
                file_mib=os.path.getsize(path) / 2**20,
                generate_seconds=gen_seconds,
                rows_per_second=r["rows_read"] / r["seconds"],
                output_mib=r["samples"] * (4 * 4 + 3) / 2**20,
                chunk_mib=_CHUNK_MB.value,
                partition_mib=_PARTITION_MB.value,
            )
            results.append(r)
            print(
                f"rows {rows:>11,}  file {r['file_mib']:7.0f} MiB  samples {r['samples']:>11,}  "
                f"preprocess {r['seconds']:7.1f} s  {r['rows_per_second']:>10,.0f} rows/s  "
                f"peak RSS {r['peak_rss_mib']:6.0f} MiB (after imports {r['rss_after_imports_mib']:.0f}"
                f", output arrays {r['output_mib']:.0f})",
                flush=True,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
