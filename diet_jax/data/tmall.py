"""Tmall Repeat Buyers (Tianchi dataset 42, IJCAI-15, `data_format1`) -> stage store.

Raw files (with header rows): `user_log_format1.csv` (`user_id,item_id,cat_id,seller_id,
brand_id,time_stamp,action_type`; `time_stamp` is mmdd with no year, `brand_id` may be empty,
action 0 click, 1 add-to-cart, 2 purchase, 3 add-to-favourite; the log is not time-ordered) joined
on user_id with `user_info_format1.csv` (`user_id,age_range,gender`, either may be empty). Rows
outside every stage (the log runs on to 11/11) are counted, not errors.

Samples (a proposal; the paper does not say how it builds them): one sample per
(user, item, day) group; tasks `purchase`, `favourite`, `cart` = whether the action occurs in the
group (cart is rare, about 0.14% of the log); 8 fields `user_id, item_id, cat_id, seller_id,
brand_id, age_range, gender, weekday`. Item attributes are the group's smallest non-empty
value; an empty or missing age_range counts as 0 and gender as 2 (the files' own "unknown"
codes); weekday assumes the year `data.year` (2014, uncertain: the files carry no year).
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diet_jax.data import raw
from diet_jax.data.store import FeatureMap

LOG = "user_log_format1.csv"
USERS = "user_info_format1.csv"
LOG_COLUMNS = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "cat_id": pl.Int64,
    "seller_id": pl.Int64,
    "brand_id": pl.Int64,
    "time_stamp": pl.Int64,
    "action_type": pl.Int64,
}
USER_COLUMNS = {"user_id": pl.Int64, "age_range": pl.Int64, "gender": pl.Int64}
ACTIONS = {"click": 0, "cart": 1, "purchase": 2, "favourite": 3}
FIELDS = (
    "user_id",
    "item_id",
    "cat_id",
    "seller_id",
    "brand_id",
    "age_range",
    "gender",
    "weekday",
)
TASKS = ("purchase", "favourite", "cart")
UNKNOWN_AGE, UNKNOWN_GENDER = 0, 2
HOW_TO_GET = (
    "Download 'data_format1 .zip' (the name has a space) from Tianchi "
    "(https://tianchi.aliyun.com/dataset/42) and unzip it; the files are in its data_format1/ "
    "folder."
)


def stage_spans(data_cfg) -> list[raw.Span]:
    """`data.stages`, checked: Tmall dates carry no year, so every stage lies in `data.year`."""
    spans = raw.parse_stages(data_cfg.stages)
    year = int(data_cfg.year)
    for s in spans:
        if s.start.year != year or (s.end.year, s.end.month, s.end.day) > (year + 1, 1, 1):
            raise ValueError(
                f"data.stages {s.name!r}: Tmall dates carry no year, so every stage must lie in "
                f"data.year = {year}."
            )
    return spans


def build(data_cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Reads the two data_format1 files in `data_dir` and writes the stage store at `root`."""
    log_path = raw.require_file(data_cfg.data_dir, LOG, dataset="tmall", how_to_get=HOW_TO_GET)
    user_path = raw.require_file(data_cfg.data_dir, USERS, dataset="tmall", how_to_get=HOW_TO_GET)
    spans = stage_spans(data_cfg)
    year = int(data_cfg.year)
    # mmdd keys compare like the dates within one year; the end of 12/31 is 1232.
    starts = [s.start.month * 100 + s.start.day for s in spans]
    ends = [1232 if s.end.year > year else s.end.month * 100 + s.end.day for s in spans]
    users = _read_users(user_path, data_cfg.chunk_bytes)
    size = os.path.getsize(log_path)
    n_parts = raw.num_partitions(size, data_cfg.partition_bytes)
    rows_read, action_SxA = 0, np.zeros((len(spans), len(ACTIONS)), np.int64)

    with raw.Spill(root) as spill:
        # Pass 1: validate, keep in-window rows, partition by user.
        bar = tqdm(total=size, desc="tmall: read", unit="B", unit_scale=True, disable=not progress)
        for block in raw.iter_csv(
            log_path,
            LOG_COLUMNS,
            header=True,
            nullable=("brand_id",),
            chunk_bytes=data_cfg.chunk_bytes,
            bar=bar,
        ):
            df = block.df
            block.fail_where(
                ~df["action_type"].is_in(list(ACTIONS.values())),
                "action_type",
                "expected an action type in 0..3",
            )
            mmdd = df["time_stamp"]
            block.fail_where(
                ~df.select(_valid_mmdd(pl.col("time_stamp"), year)).to_series(),
                "time_stamp",
                f"expected a date mmdd of {year}",
            )
            stage_N = raw.assign_stages(mmdd.to_numpy(), starts, ends)
            inside = stage_N >= 0
            rows_read += df.height
            np.add.at(action_SxA, (stage_N[inside], df["action_type"].to_numpy()[inside]), 1)
            kept = df.with_columns(stage=pl.Series(stage_N)).filter(pl.Series(inside))
            raw.spill_partitioned(spill, kept, "user_id", n_parts)
        bar.close()

        # Pass 2: one (user, item, day) group -> one sample, partition by partition.
        parts = []
        for p in tqdm(range(n_parts), desc="tmall: group", disable=not progress):
            files = spill.files(f"rows/{p}")
            if files:
                samples = _samples(pl.scan_ipc(files), users.lazy(), year).collect()
                parts.append(spill.write("samples", samples))

        in_window = int(action_SxA.sum())
        extra = {
            "source": "tmall",
            "raw_files": {LOG: size, USERS: os.path.getsize(user_path)},
            "rows_read": rows_read,
            "rows_outside_stages": rows_read - in_window,
            "stage_raw_rows": {s.name: int(action_SxA[i].sum()) for i, s in enumerate(spans)},
            "stage_actions": {
                s.name: dict(zip(ACTIONS, action_SxA[i].tolist(), strict=True))
                for i, s in enumerate(spans)
            },
            "year": year,
            "sample": "one (user_id, item_id, day) group of rows [proposal]",
        }
        return raw.write_store(
            root,
            dataset="tmall",
            fields=FIELDS,
            tasks=TASKS,
            spans=spans,
            parts=parts,
            min_count=data_cfg.min_count,
            progress=progress,
            extra=extra,
        )


def _valid_mmdd(key: pl.Expr, year: int) -> pl.Expr:
    month, day = key // 100, key % 100
    days_in_month = pl.date(year, month.clip(1, 12), 1).dt.month_end().dt.day()
    return month.is_between(1, 12) & (day >= 1) & (day <= days_in_month)


def _read_users(path: str, chunk_bytes: int) -> pl.DataFrame:
    """user_info, one row per user (the first if a user is listed twice), unknowns filled."""
    blocks = [
        b.df
        for b in raw.iter_csv(
            path,
            USER_COLUMNS,
            header=True,
            nullable=("age_range", "gender"),
            chunk_bytes=chunk_bytes,
        )
    ]
    users = pl.concat(blocks) if blocks else pl.DataFrame(schema=USER_COLUMNS)
    return users.unique("user_id", keep="first", maintain_order=True).with_columns(
        pl.col("age_range").fill_null(UNKNOWN_AGE), pl.col("gender").fill_null(UNKNOWN_GENDER)
    )


def _samples(rows: pl.LazyFrame, users: pl.LazyFrame, year: int) -> pl.LazyFrame:
    a = pl.col("action_type")
    ts = pl.col("time_stamp")
    return (
        rows.group_by("user_id", "item_id", "time_stamp", maintain_order=True)
        .agg(
            pl.col("stage").first(),
            pl.col("cat_id").min(),
            pl.col("seller_id").min(),
            pl.col("brand_id").min(),
            *[(a == ACTIONS[t]).any().alias(t) for t in TASKS],
        )
        .join(users, on="user_id", how="left", maintain_order="left")
        .with_columns(
            pl.col("age_range").fill_null(UNKNOWN_AGE),
            pl.col("gender").fill_null(UNKNOWN_GENDER),
            weekday=pl.date(year, ts // 100, ts % 100).dt.weekday(),
        )
        .select("stage", *FIELDS, *TASKS)
    )
