"""Taobao UserBehavior (Tianchi dataset 649) -> stage store.

Raw file `UserBehavior.csv`: no header, 5 columns `user_id,item_id,category_id,behavior_type,
timestamp`, behaviour in {pv, buy, cart, fav}, Unix seconds. Days are taken in Beijing time
(UTC+8, `data.utc_offset_hours`); rows outside every stage (about 0.06% of the file: negative
times, 2037, 11/22-11/24, 12/04) are counted, not errors.

Samples (a proposal; the paper does not say how it builds them): one sample per
(user, item, Beijing day) group of rows; tasks `cart`, `fav`, `buy` = whether that behaviour occurs
in the group (a pv-only group is negative for all three); 4 fields `user_id, item_id,
category_id, hour`, where hour is the Beijing hour of the group's first event and category_id the
group's category (the smallest if an item is logged under several). Duplicate rows are kept
(they fall into one group).
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diet_jax.data import raw
from diet_jax.data.store import FeatureMap

FILE = "UserBehavior.csv"
COLUMNS = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "category_id": pl.Int64,
    "behavior_type": pl.String,
    "timestamp": pl.Int64,
}
BEHAVIORS = ("pv", "buy", "cart", "fav")
FIELDS = ("user_id", "item_id", "category_id", "hour")
TASKS = ("cart", "fav", "buy")
HOW_TO_GET = (
    "Download UserBehavior.csv.zip from Tianchi (https://tianchi.aliyun.com/dataset/649) and "
    "unzip it."
)


def build(data_cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Reads `<data_dir>/UserBehavior.csv` and writes the stage store at `root`."""
    path = raw.require_file(data_cfg.data_dir, FILE, dataset="taobao", how_to_get=HOW_TO_GET)
    spans = raw.parse_stages(data_cfg.stages)
    offset = int(round(float(data_cfg.utc_offset_hours) * 3600))
    starts = [raw.epoch_seconds(s.start, data_cfg.utc_offset_hours) for s in spans]
    ends = [raw.epoch_seconds(s.end, data_cfg.utc_offset_hours) for s in spans]
    size = os.path.getsize(path)
    n_parts = raw.num_partitions(size, data_cfg.partition_bytes)
    rows_read, behaviour_SxB = 0, np.zeros((len(spans), len(BEHAVIORS)), np.int64)

    with raw.Spill(root) as spill:
        # Pass 1: validate, keep in-window rows, partition by user.
        bar = tqdm(total=size, desc="taobao: read", unit="B", unit_scale=True, disable=not progress)
        for block in raw.iter_csv(
            path, COLUMNS, header=False, chunk_bytes=data_cfg.chunk_bytes, bar=bar
        ):
            df = block.df
            behaviour = df["behavior_type"]
            block.fail_where(
                ~behaviour.is_in(BEHAVIORS), "behavior_type", f"expected one of {BEHAVIORS}"
            )
            stage_N = raw.assign_stages(df["timestamp"].to_numpy(), starts, ends)
            code_N = behaviour.replace_strict(BEHAVIORS, range(4), return_dtype=pl.Int8).to_numpy()
            rows_read += df.height
            inside = stage_N >= 0
            np.add.at(behaviour_SxB, (stage_N[inside], code_N[inside]), 1)
            kept = (
                df.with_columns(stage=pl.Series(stage_N), b=pl.Series(code_N))
                .drop("behavior_type")
                .filter(pl.Series(inside))
            )
            raw.spill_partitioned(spill, kept, "user_id", n_parts)
        bar.close()

        # Pass 2: one (user, item, day) group -> one sample, partition by partition.
        parts = []
        for p in tqdm(range(n_parts), desc="taobao: group", disable=not progress):
            files = spill.files(f"rows/{p}")
            if files:
                parts.append(spill.write("samples", _samples(pl.scan_ipc(files), offset).collect()))

        in_window = int(behaviour_SxB.sum())
        extra = {
            "source": "taobao",
            "raw_files": {FILE: size},
            "rows_read": rows_read,
            "rows_outside_stages": rows_read - in_window,
            "stage_raw_rows": {s.name: int(behaviour_SxB[i].sum()) for i, s in enumerate(spans)},
            "stage_behaviours": {
                s.name: dict(zip(BEHAVIORS, behaviour_SxB[i].tolist(), strict=True))
                for i, s in enumerate(spans)
            },
            "utc_offset_hours": float(data_cfg.utc_offset_hours),
            "sample": "one (user_id, item_id, day) group of rows [proposal]",
        }
        return raw.write_store(
            root,
            dataset="taobao",
            fields=FIELDS,
            tasks=TASKS,
            spans=spans,
            parts=parts,
            min_count=data_cfg.min_count,
            progress=progress,
            extra=extra,
        )


def _samples(rows: pl.LazyFrame, offset: int) -> pl.LazyFrame:
    b = pl.col("b")
    day = ((pl.col("timestamp") + offset) // 86400).alias("day")
    return (
        # maintain_order: samples in order of first appearance, so the store is deterministic
        # without a multi-key sort (3x the group-by's time).
        rows.group_by("user_id", "item_id", day, maintain_order=True)
        .agg(
            pl.col("stage").first(),
            pl.col("category_id").min(),
            pl.col("timestamp").min().alias("first_ts"),
            (b == BEHAVIORS.index("cart")).any().alias("cart"),
            (b == BEHAVIORS.index("fav")).any().alias("fav"),
            (b == BEHAVIORS.index("buy")).any().alias("buy"),
        )
        .with_columns(hour=((pl.col("first_ts") + offset) % 86400) // 3600)
        .select("stage", *FIELDS, *TASKS)
    )
