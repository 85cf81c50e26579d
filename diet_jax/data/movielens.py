"""MovieLens-100K, read from the atomic files inside the pinned recbole 1.2.1 wheel -> stage store.

A small real dataset that runs offline once the wheel is cached: `pip download --no-deps
recbole==1.2.1` fetches it into `data.data_dir` (a cache folder, never the repository: the
ML-100K terms forbid redistribution), its sha256 is checked, and `ml-100k.inter`, `.user` and
`.item` (tab-separated, one `name:type` header line) are read straight from the zip. recbole
itself is never installed.

Samples, tasks and fields (a proposal; MovieLens is not in the paper): one sample per rating;
tasks `rating_ge_4`, `rating_eq_5`, `rating_le_2`; 8 fields `user_id, item_id, age, gender,
occupation, zip_prefix` (first 3 characters of the zip code), `release_year, first_genre`
(first token of `class`); stages by calendar month in UTC (`data.stages`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import polars as pl

from diet_jax.data import raw
from diet_jax.data.store import FeatureMap
from diet_jax.errors import DataError, MissingDataError

REQUIREMENT = "recbole==1.2.1"
WHEEL = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
INTER_COLUMNS = {
    "user_id:token": pl.String,
    "item_id:token": pl.String,
    "rating:float": pl.Float64,
    "timestamp:float": pl.Float64,
}
USER_COLUMNS = {
    "user_id:token": pl.String,
    "age:token": pl.String,
    "gender:token": pl.String,
    "occupation:token": pl.String,
    "zip_code:token": pl.String,
}
ITEM_COLUMNS = {
    "item_id:token": pl.String,
    "release_year:token": pl.String,
    "class:token_seq": pl.String,
}
FIELDS = (
    "user_id",
    "item_id",
    "age",
    "gender",
    "occupation",
    "zip_prefix",
    "release_year",
    "first_genre",
)
TASKS = ("rating_ge_4", "rating_eq_5", "rating_le_2")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(data_cfg) -> str:
    """The cached wheel's path; downloads it with `pip download --no-deps` if it is absent."""
    folder = os.path.abspath(os.path.expanduser(data_cfg.data_dir))
    path = os.path.join(folder, data_cfg.wheel)
    if not os.path.isfile(path):
        if not data_cfg.download:
            raw.require_file(
                folder,
                data_cfg.wheel,
                dataset="movielens",
                how_to_get=f"Run `pip download --no-deps {data_cfg.requirement} -d {folder}`.",
            )
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            done = subprocess.run(
                [*cmd, data_cfg.requirement, "-d", tmp], capture_output=True, text=True
            )
            got = os.path.join(tmp, data_cfg.wheel)
            if done.returncode != 0 or not os.path.isfile(got):
                raise MissingDataError(
                    f"movielens: could not download {data_cfg.requirement} ({data_cfg.wheel}) "
                    f"with pip: {(done.stderr or done.stdout).strip()[-500:]}\nFetch it on a "
                    f"machine with access to PyPI (`pip download --no-deps {data_cfg.requirement}"
                    f"`) and put {data_cfg.wheel} in {folder} (config.data.data_dir)."
                )
            _check_sha(got, data_cfg.wheel_sha256, downloaded=True)
            shutil.move(got, path)  # same folder: an atomic rename
    _check_sha(path, data_cfg.wheel_sha256, downloaded=False)
    return path


def _check_sha(path: str, expected: str, *, downloaded: bool) -> None:
    got = sha256(path)
    if got != expected:
        hint = "PyPI served another file" if downloaded else "delete it and rerun to download again"
        raise DataError(
            f"movielens: {path} has sha256 {got}, expected {expected} "
            f"(config.data.wheel_sha256); {hint}."
        )


def build(data_cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Reads ML-100K from the cached recbole wheel and writes the stage store at `root`."""
    wheel = fetch_wheel(data_cfg)
    spans = raw.parse_stages(data_cfg.stages)
    starts = [raw.epoch_seconds(s.start, data_cfg.utc_offset_hours) for s in spans]
    ends = [raw.epoch_seconds(s.end, data_cfg.utc_offset_hours) for s in spans]
    with zipfile.ZipFile(wheel) as z:

        def read(suffix, columns, nullable=()):
            member = MEMBER.format(suffix)
            if member not in z.namelist():
                raise MissingDataError(f"movielens: {wheel} has no member {member}.")
            blocks = raw.iter_csv(
                f"{wheel}!{member}",
                columns,
                header=True,
                nullable=nullable,
                separator="\t",
                chunk_bytes=data_cfg.chunk_bytes,
                opener=lambda: z.open(member),
            )
            return list(blocks)

        inter_blocks = read("inter", INTER_COLUMNS)
        users = pl.concat([b.df for b in read("user", USER_COLUMNS, list(USER_COLUMNS)[1:])])
        items = pl.concat([b.df for b in read("item", ITEM_COLUMNS, list(ITEM_COLUMNS)[1:])])

    users = users.rename(lambda c: c.split(":")[0]).unique("user_id", keep="first")
    users = users.select(
        "user_id", "age", "gender", "occupation", zip_prefix=pl.col("zip_code").str.slice(0, 3)
    )
    items = items.rename(lambda c: c.split(":")[0]).unique("item_id", keep="first")
    items = items.select(
        "item_id", "release_year", first_genre=pl.col("class").str.split(" ").list.first()
    )
    frames, rows_read = [], 0
    for block in inter_blocks:
        df = block.df
        rating = df["rating:float"]
        block.fail_where(
            ~rating.is_in([1.0, 2.0, 3.0, 4.0, 5.0]), "rating:float", "expected a rating in 1..5"
        )
        stage_N = raw.assign_stages(
            np.floor(df["timestamp:float"].to_numpy()).astype(np.int64), starts, ends
        )
        rows_read += df.height
        frames.append(
            df.rename(lambda c: c.split(":")[0])
            .with_columns(
                stage=pl.Series(stage_N),
                rating_ge_4=pl.col("rating") >= 4,
                rating_eq_5=pl.col("rating") == 5,
                rating_le_2=pl.col("rating") <= 2,
            )
            .filter(pl.col("stage") >= 0)
        )
    samples = (
        pl.concat(frames)
        .join(users, on="user_id", how="left", maintain_order="left")
        .join(items, on="item_id", how="left", maintain_order="left")
        .sort("stage", "timestamp", maintain_order=True)
        .select("stage", *FIELDS, *TASKS)
    )
    with raw.Spill(root) as spill:
        parts = [spill.write("samples", samples)]
        stage_rows = samples["stage"].value_counts()
        counts = dict(stage_rows.iter_rows())
        extra = {
            "source": "movielens",
            "raw_files": {data_cfg.wheel: os.path.getsize(wheel)},
            "wheel_sha256": data_cfg.wheel_sha256,
            "rows_read": rows_read,
            "rows_outside_stages": rows_read - samples.height,
            "stage_raw_rows": {s.name: int(counts.get(i, 0)) for i, s in enumerate(spans)},
            "sample": "one rating [proposal]",
        }
        return raw.write_store(
            root,
            dataset="movielens",
            fields=FIELDS,
            tasks=TASKS,
            spans=spans,
            parts=parts,
            min_count=data_cfg.min_count,
            progress=progress,
            extra=extra,
        )
