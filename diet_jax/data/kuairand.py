"""KuaiRand-1K (zenodo 10439422) -> stage store.

Raw files (`KuaiRand-1K/data/`, CSV with header rows): the two standard logs
`log_standard_4_08_to_4_21_1k.csv` and `log_standard_4_22_to_5_08_1k.csv` (19 int columns; `date`
is yyyymmdd), joined on user_id with `user_features_1k.csv` and on video_id with
`video_features_basic_1k.csv`. The random log is not used (DIET's 8,799,733 interactions are the
standard logs only) and neither is `video_features_statistic_1k.csv`: its counts are aggregated
over the whole month, so using them would leak the future. Rows before the first stage (04/08 to
04/15) are counted, not errors. Exact-duplicate log rows are kept, as DIET's counts imply.

Samples (a proposal; the paper only says 17 fields and 3 tasks): one sample per log row; tasks
`is_click`, `is_like`, `long_view`; 17 fields `user_id, video_id, tab, hour` (hour = hourmin //
100) from the log, 8 user features and 5 video features (`first_tag` is the first id of the
comma list `tag`). Empty values, `UNKNOWN` and the sentinel `-124` (is_live_streamer of 782 of
the 1,000 users) are treated as missing and map to the OOV id 0.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diet_jax.data import raw
from diet_jax.data.store import FeatureMap

LOGS = ("log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv")
USERS = "user_features_1k.csv"
VIDEOS = "video_features_basic_1k.csv"
TASKS = ("is_click", "is_like", "long_view")
LOG_COLUMNS = {
    c: pl.Int64 for c in ("user_id", "video_id", "date", "hourmin", "time_ms", "tab", *TASKS)
}
USER_FIELDS = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)
USER_COLUMNS = {"user_id": pl.Int64, **{c: pl.String for c in USER_FIELDS}}
VIDEO_COLUMNS = {
    "video_id": pl.Int64,
    "author_id": pl.Int64,
    "video_type": pl.String,
    "upload_type": pl.String,
    "music_type": pl.String,
    "tag": pl.String,
}
VIDEO_FIELDS = ("author_id", "video_type", "upload_type", "music_type", "first_tag")
FIELDS = ("user_id", "video_id", "tab", "hour", *USER_FIELDS, *VIDEO_FIELDS)
MISSING = ("", "UNKNOWN", "-124")
HOW_TO_GET = (
    "Download KuaiRand-1K.tar.gz from https://kuairand.com (zenodo record 10439422) and untar it; "
    "the files are in KuaiRand-1K/data/."
)


def build(data_cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Reads the KuaiRand-1K files in `data_dir` and writes the stage store at `root`."""

    def need(name):
        return raw.require_file(data_cfg.data_dir, name, dataset="kuairand", how_to_get=HOW_TO_GET)

    log_paths = [need(n) for n in LOGS]
    user_path, video_path = need(USERS), need(VIDEOS)
    spans = raw.parse_stages(data_cfg.stages)
    starts = [raw.date_key(s.start) for s in spans]
    ends = [raw.date_key(s.end) for s in spans]
    users = _read_users(user_path, data_cfg.chunk_bytes)
    videos = _read_videos(video_path, data_cfg.chunk_bytes, progress)
    rows_read, rows_S = {}, np.zeros(len(spans), np.int64)

    with raw.Spill(root) as spill:
        # One pass: every log row is a sample; no grouping, so each block is one part.
        parts = []
        total = sum(os.path.getsize(p) for p in log_paths)
        bar = tqdm(
            total=total, desc="kuairand: read", unit="B", unit_scale=True, disable=not progress
        )
        for name, path in zip(LOGS, log_paths, strict=True):
            rows_read[name] = 0
            for block in raw.iter_csv(
                path, LOG_COLUMNS, header=True, chunk_bytes=data_cfg.chunk_bytes, bar=bar
            ):
                df = block.df
                for t in TASKS:
                    block.fail_where(~df[t].is_in([0, 1]), t, "expected a 0/1 label")
                block.fail_where(
                    ~df.select(raw.valid_yyyymmdd(pl.col("date"))).to_series(),
                    "date",
                    "expected a date yyyymmdd",
                )
                stage_N = raw.assign_stages(df["date"].to_numpy(), starts, ends)
                rows_read[name] += df.height
                rows_S += np.bincount(stage_N[stage_N >= 0], minlength=len(spans))
                kept = df.with_columns(stage=pl.Series(stage_N)).filter(pl.col("stage") >= 0)
                if kept.height:
                    parts.append(spill.write("samples", _samples(kept, users, videos)))
        bar.close()
        del videos
        n_read = sum(rows_read.values())
        extra = {
            "source": "kuairand",
            "raw_files": {n: os.path.getsize(p) for n, p in zip(LOGS, log_paths, strict=True)}
            | {USERS: os.path.getsize(user_path), VIDEOS: os.path.getsize(video_path)},
            "rows_read": n_read,
            "rows_read_per_file": rows_read,
            "rows_outside_stages": n_read - int(rows_S.sum()),
            "stage_raw_rows": {s.name: int(rows_S[i]) for i, s in enumerate(spans)},
            "missing_values": list(MISSING),
            "sample": "one standard-log row [proposal]",
        }
        return raw.write_store(
            root,
            dataset="kuairand",
            fields=FIELDS,
            tasks=TASKS,
            spans=spans,
            parts=parts,
            min_count=data_cfg.min_count,
            progress=progress,
            extra=extra,
        )


def _missing_to_null(columns) -> list[pl.Expr]:
    return [
        pl.when(pl.col(c).str.strip_chars().is_in(MISSING)).then(None).otherwise(pl.col(c)).alias(c)
        for c in columns
    ]


def _read_users(path: str, chunk_bytes: int) -> pl.DataFrame:
    blocks = [
        b.df
        for b in raw.iter_csv(
            path,
            USER_COLUMNS,
            header=True,
            nullable=USER_FIELDS,
            quoted=True,
            chunk_bytes=chunk_bytes,
        )
    ]
    users = pl.concat(blocks) if blocks else pl.DataFrame(schema=USER_COLUMNS)
    return users.unique("user_id", keep="first", maintain_order=True).with_columns(
        _missing_to_null(USER_FIELDS)
    )


def _read_videos(path: str, chunk_bytes: int, progress: bool) -> pl.DataFrame:
    """The five video fields of every video (first row per video_id), about 4.4M rows."""
    bar = tqdm(
        total=os.path.getsize(path),
        desc="kuairand: videos",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    blocks = []
    for b in raw.iter_csv(
        path,
        VIDEO_COLUMNS,
        header=True,
        nullable=tuple(c for c in VIDEO_COLUMNS if c != "video_id"),
        quoted=True,
        chunk_bytes=chunk_bytes,
        bar=bar,
    ):
        blocks.append(
            b.df.with_columns(
                first_tag=pl.col("tag").str.split(",").list.first().str.strip_chars()
            ).select("video_id", *VIDEO_FIELDS)
        )
    bar.close()
    videos = pl.concat(blocks) if blocks else pl.DataFrame(schema={"video_id": pl.Int64})
    string_fields = [c for c in VIDEO_FIELDS if c != "author_id"]
    return videos.unique("video_id", keep="first", maintain_order=True).with_columns(
        _missing_to_null(string_fields)
    )


def _samples(log: pl.DataFrame, users: pl.DataFrame, videos: pl.DataFrame) -> pl.DataFrame:
    return (
        log.with_columns(hour=pl.col("hourmin") // 100)
        .join(users, on="user_id", how="left", maintain_order="left")
        .join(videos, on="video_id", how="left", maintain_order="left")
        .select("stage", *FIELDS, *TASKS)
    )
