"""Shared machinery of the real-dataset readers: validated CSV blocks, stages, vocabularies, store.

Every reader follows the same three passes, so that a file of any size goes through with memory
bounded by the output arrays plus a fixed chunk:

1. Stream the raw CSV in blocks of `data.chunk_bytes` (cut at line ends), parse each block with
   polars (typed, multi-threaded), validate it, drop rows outside every stage (counted), and spill
   the kept rows to Arrow IPC files, hash-partitioned on the key that groups rows into samples
   (the user) so that no sample straddles two partitions.
2. Turn each partition (about `data.partition_bytes` of raw text) into samples: one polars
   group-by per partition; the samples are spilled again.
3. `write_store`: fit each field's vocabulary on the historical stages (a streaming group-by over
   the spilled samples), then encode partition by partition into the stage store's memmaps.

Why polars: its CSV parser is typed and multi-threaded, it reads bytes we cut ourselves (so line
numbers stay exact and memory stays bounded), and its group-by, join and `replace_strict` run the
per-row work in native code; pyarrow lacks a fast group-by-any and duckdb hides chunking.

Ids: 0 is the out-of-vocabulary id of every field (unseen, rare, or missing values); the values
seen at least `data.min_count` times in the historical stages get 1..N in sorted order.
Intermediate files live in `<store>.spill-<pid>` and are always removed; the store itself is
written through `StoreWriter`, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
from absl import logging
from tqdm.auto import tqdm

from diet_jax.data.store import FeatureMap, StoreWriter
from diet_jax.errors import DataError, MissingDataError

OOV = 0
ROLE_ORDER = ("subsequent", "validation", "test")
_INT_RE = r"^\s*[+-]?\d{1,18}\s*$"
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


class RawFormatError(DataError):
    """A malformed raw file: names the file, the 1-based line and, where known, the column."""

    def __init__(self, path: str, line: int, column: str | None, message: str):
        self.path, self.line, self.column = path, line, column
        where = f"{path}, line {line}" + (f", {column}" if column else "")
        super().__init__(f"{where}: {message}")


def require_file(data_dir: str, name: str, *, dataset: str, how_to_get: str) -> str:
    """The path of raw file `name` in `data_dir`, or an error saying what to fetch and where."""
    folder = os.path.abspath(os.path.expanduser(data_dir or "."))
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{dataset}: raw file {name!r} is missing (looked for {path}). {how_to_get} "
            f"Put {name!r} in {folder} (config.data.data_dir), or pass "
            f"--config.data.data_dir=<folder that holds it>."
        )
    return path


# ---------------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class Span:
    """One stage: the days [start, end) (end excluded)."""

    name: str
    role: str
    start: datetime.date
    end: datetime.date


def parse_stages(stages) -> list[Span]:
    """Checks `data.stages` ((name, role, 'YYYY-MM-DD' start, end excluded), ...) and returns it.

    Roles must be one or more historical stages, then subsequent, validation and test, in time
    order and without overlap.
    """
    spans = []
    for i, entry in enumerate(stages):
        if len(entry) != 4:
            raise ValueError(
                f"data.stages[{i}] = {entry!r}: expected (name, role, 'YYYY-MM-DD', 'YYYY-MM-DD')."
            )
        name, role, start, end = entry
        try:
            s, e = datetime.date.fromisoformat(start), datetime.date.fromisoformat(end)
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.stages[{i}] ({name!r}): dates must be 'YYYY-MM-DD'.") from err
        if s >= e:
            raise ValueError(f"data.stages[{i}] ({name!r}): start {start} is not before end {end}.")
        if spans and s < spans[-1].end:
            raise ValueError(
                f"data.stages[{i}] ({name!r}) starts before {spans[-1].name!r} ends: stages must "
                "be in time order without overlap."
            )
        spans.append(Span(str(name), str(role), s, e))
    roles = [s.role for s in spans]
    n_hist = len(roles) - len(ROLE_ORDER)
    if n_hist < 1 or roles != ["historical"] * n_hist + list(ROLE_ORDER):
        raise ValueError(
            f"data.stages roles are {roles}; expected one or more 'historical' stages followed by "
            f"{', '.join(ROLE_ORDER)}."
        )
    if len({s.name for s in spans}) != len(spans):
        raise ValueError(f"data.stages names must be unique, got {[s.name for s in spans]}.")
    return spans


def epoch_seconds(day: datetime.date, utc_offset_hours: float = 0.0) -> int:
    """Unix seconds of local midnight at the start of `day` in the UTC+offset time zone."""
    days = (day - datetime.date(1970, 1, 1)).days
    return int(days * 86400 - round(utc_offset_hours * 3600))


def date_key(day: datetime.date) -> int:
    """yyyymmdd as an int: ordered like the dates, so half-open ranges compare correctly."""
    return day.year * 10000 + day.month * 100 + day.day


def assign_stages(key_N: np.ndarray, starts: Sequence[int], ends: Sequence[int]) -> np.ndarray:
    """The stage index of every key (int8), -1 for keys outside every [start, end)."""
    starts_S, ends_S = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    idx = np.searchsorted(starts_S, key_N, side="right") - 1
    inside = (idx >= 0) & (key_N < ends_S[np.maximum(idx, 0)])
    return np.where(inside, idx, -1).astype(np.int8)


def valid_yyyymmdd(key: pl.Expr) -> pl.Expr:
    """True where an int yyyymmdd (or mmdd) key has a month in 1..12 and a day in 1..31."""
    month, day = (key // 100) % 100, key % 100
    return month.is_between(1, 12) & day.is_between(1, 31)


# ---------------------------------------------------------------------------------- CSV


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows of one block of a CSV file; row i is line `first_line + i` (1-based, header counted)."""

    df: pl.DataFrame
    first_line: int
    path: str
    names: tuple[str, ...]  # every column of the file, in file order (for column numbers)

    def column_ref(self, name: str) -> str:
        return f"column {self.names.index(name) + 1} ({name})"

    def fail_where(self, bad, column: str, message: str) -> None:
        """Raises RawFormatError at the first row where `bad` (bool Series or array) is true."""
        if isinstance(bad, pl.Series):
            bad = bad.fill_null(False).to_numpy()  # a null comparison counts as not bad
        bad_N = np.asarray(bad, dtype=bool)
        if bad_N.any():
            i = int(np.argmax(bad_N))
            value = self.df[column][i]
            raise RawFormatError(
                self.path, self.first_line + i, self.column_ref(column), f"{message}, got {value!r}"
            )


def iter_csv(
    path: str,
    columns: dict[str, Any],
    *,
    header: bool,
    nullable: Sequence[str] = (),
    separator: str = ",",
    quoted: bool = False,
    chunk_bytes: int = 64 << 20,
    opener: Callable[[], Any] | None = None,
    bar: tqdm | None = None,
) -> Iterator[Block]:
    """Streams a CSV file as validated, typed blocks of about `chunk_bytes` bytes.

    `columns` maps the columns to return to their polars dtypes. Without a header the file must
    have exactly these columns in this order; with one, the header must name them all (other
    columns are read as text and dropped). A wrong column count, a value that does not parse, or
    an empty value in a column not listed in `nullable` raises RawFormatError naming the line and
    the column. `quoted` allows "..." fields (with no line breaks inside); `opener` opens a
    binary stream instead of `path` (a zip member); `bar` is advanced by the bytes read.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"data.chunk_bytes must be positive, got {chunk_bytes}.")
    with opener() if opener is not None else open(path, "rb") as f:
        line = 1
        if header:
            head = f.readline()
            if bar is not None:
                bar.update(len(head))
            if not head.strip():
                raise DataError(f"{path}: the file is empty (expected a header line).")
            text = head.decode("utf-8").rstrip("\r\n")
            names = [n.strip().strip('"') for n in text.split(separator)]
            missing = [c for c in columns if c not in names]
            if missing or len(set(names)) != len(names):
                raise RawFormatError(
                    path,
                    1,
                    None,
                    f"header {names} lacks column(s) {missing}"
                    if missing
                    else f"header {names} repeats a column name",
                )
            line = 2
        else:
            names = list(columns)
        schema = {n: columns.get(n, pl.String) for n in names}
        required = [c for c in columns if c not in nullable]
        first = True
        while True:
            block = f.read(chunk_bytes)
            if first and not block:
                # Said here, by name: later it would only show as stages without samples.
                what = "a header line but no data rows" if header else "no data rows"
                raise DataError(f"{path}: the file is empty ({what}).")
            first = False
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()  # finish the last line (b"" at the end of the file)
            if bar is not None:
                bar.update(len(block))
            n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            df = _parse_block(block, n_lines, line, path, schema, required, separator, quoted)
            yield Block(df.select(list(columns)), line, path, tuple(names))
            line += n_lines


def _parse_block(block, n_lines, first_line, path, schema, required, sep, quoted) -> pl.DataFrame:
    """Typed parse of one block; on any sign of trouble, finds the exact line and column."""
    err: Exception | None = None
    df = None
    try:
        df = pl.read_csv(
            block,
            has_header=False,
            schema=schema,
            separator=sep,
            quote_char='"' if quoted else None,
            raise_if_empty=False,
        )
    except (pl.exceptions.PolarsError, ValueError) as e:
        err = e
    ok = df is not None and df.height == n_lines
    if ok and required:
        ok = sum(df.select(pl.col(required).null_count()).row(0)) == 0
    if ok and not quoted:
        # A short line whose missing fields are all nullable would parse silently; counting the
        # separators is a cheap exact check when no field may contain one.
        ok = block.count(sep.encode()) == n_lines * (len(schema) - 1)
    if ok:
        return df
    found = _diagnose(block, first_line, path, schema, required, sep, quoted)
    if found is not None:
        raise found from err
    raise RawFormatError(
        path,
        first_line,
        None,
        f"could not read lines {first_line}-{first_line + n_lines - 1}: "
        f"{str(err).splitlines()[0] if err else 'unexpected number of rows'}",
    ) from err


def _diagnose(block, first_line, path, schema, required, sep, quoted) -> RawFormatError | None:
    """The first malformed line of a block, found with vectorized string checks."""
    text = block.decode("utf-8", errors="replace")
    lines = pl.Series([text]).str.split("\n").explode()
    if text.endswith("\n"):
        lines = lines.head(-1)
    lines = lines.str.strip_suffix("\r")
    if quoted:
        lines = lines.str.replace_all(r'"[^"]*"', "Q")
    names = list(schema)
    n_fields = (lines.str.count_matches(sep, literal=True) + 1).to_numpy()
    problems = []  # (row, column index or -1, message)
    bad_count = np.flatnonzero(n_fields != len(names))
    if bad_count.size:
        i = int(bad_count[0])
        problems.append((i, -1, f"expected {len(names)} columns, found {n_fields[i]}"))
    parts = lines.str.split(sep)
    ok_rows = n_fields == len(names)
    for j, name in enumerate(names):
        dtype = schema[name]
        v = parts.list.get(j, null_on_oob=True).str.strip_chars()
        empty = (v.is_null() | (v == "")).to_numpy()
        if dtype.is_integer() or dtype.is_float():
            pattern = _INT_RE if dtype.is_integer() else _FLOAT_RE
            bad = ~empty & ~v.str.contains(pattern).fill_null(False).to_numpy()
            kind = "an integer" if dtype.is_integer() else "a number"
            msg = f"expected {kind} (int64 range)" if dtype.is_integer() else f"expected {kind}"
        else:
            bad, msg = np.zeros(len(v), bool), ""
        if name in required:
            bad_empty = empty & ok_rows
            first_empty = np.flatnonzero(bad_empty)
            if first_empty.size:
                problems.append((int(first_empty[0]), j, "empty value in a required column"))
        first_bad = np.flatnonzero(bad & ok_rows)
        if first_bad.size:
            i = int(first_bad[0])
            problems.append((i, j, f"{msg}, got {v[i]!r}"))
    if not problems:
        return None
    i, j, msg = min(problems, key=lambda p: (p[0], p[1]))
    column = None if j < 0 else f"column {j + 1} ({names[j]})"
    return RawFormatError(path, first_line + i, column, msg)


# ---------------------------------------------------------------------------------- spilling


class Spill:
    """A scratch folder beside the store for intermediate Arrow IPC files; always removed."""

    def __init__(self, root: str):
        self.dir = f"{os.path.abspath(root)}.spill-{os.getpid()}"
        self._count = 0

    def __enter__(self) -> Spill:
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, group: str, df: pl.DataFrame) -> str:
        d = os.path.join(self.dir, group)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{self._count:07d}.arrow")
        self._count += 1
        df.write_ipc(path, compression="uncompressed")
        return path

    def files(self, group: str) -> list[str]:
        d = os.path.join(self.dir, group)
        if not os.path.isdir(d):
            return []
        return [os.path.join(d, f) for f in sorted(os.listdir(d))]


def num_partitions(total_bytes: int, partition_bytes: int) -> int:
    if partition_bytes <= 0:
        raise ValueError(f"data.partition_bytes must be positive, got {partition_bytes}.")
    return max(1, math.ceil(total_bytes / partition_bytes))


def spill_partitioned(spill: Spill, df: pl.DataFrame, key: str, n_parts: int) -> None:
    """Appends the rows of `df` to partition `key % n_parts` (group `rows/<p>`)."""
    if df.height == 0:
        return
    if n_parts == 1:
        spill.write("rows/0", df)
        return
    df = df.with_columns((pl.col(key) % n_parts).alias("_part"))
    for (p,), sub in df.partition_by("_part", as_dict=True).items():
        spill.write(f"rows/{p}", sub.drop("_part"))


# ---------------------------------------------------------------------------------- store


def fit_vocab(parts: Sequence[str], field: str, n_hist: int, min_count: int) -> pl.Series:
    """Sorted values of `field` seen at least `min_count` times in stages [0, n_hist)."""
    counts = (
        pl.scan_ipc(list(parts))
        .filter(pl.col("stage") < n_hist)
        .group_by(field)
        .len()
        .filter(pl.col(field).is_not_null() & (pl.col("len") >= min_count))
        .sort(field)
        .collect(engine="streaming")
    )
    return counts[field]


def encode(values: pl.Series, vocab: pl.Series) -> np.ndarray:
    """Vocabulary codes 1..N of `values`, 0 (OOV) for anything else, as int32."""
    codes = pl.int_range(1, len(vocab) + 1, eager=True, dtype=pl.Int32)
    out = values.replace_strict(vocab, codes, default=OOV, return_dtype=pl.Int32)
    return out.fill_null(OOV).to_numpy()


def write_store(
    root: str,
    *,
    dataset: str,
    fields: Sequence[str],
    tasks: Sequence[str],
    spans: Sequence[Span],
    parts: Sequence[str],
    min_count: int,
    progress: bool,
    extra: dict,
) -> FeatureMap:
    """Fits vocabularies on the historical stages and writes the spilled samples as a stage store.

    Each file in `parts` holds samples with a `stage` column (index into `spans`), one column per
    field (raw values, any dtype, null = missing) and one boolean/0-1 column per task.
    """
    if min_count < 1:
        raise ValueError(f"data.min_count must be at least 1, got {min_count}.")
    n_stages = len(spans)
    n_hist = sum(s.role == "historical" for s in spans)
    rows_S = np.zeros(n_stages, np.int64)
    if parts:
        per_stage = pl.scan_ipc(list(parts)).group_by("stage").len().collect()
        for s, n in per_stage.iter_rows():
            rows_S[s] = n
    empty = [spans[s].name for s in range(n_stages) if rows_S[s] == 0]
    if empty:
        raise DataError(
            f"{dataset}: stage(s) {empty} received no samples; check config.data.stages against "
            f"the dates in the raw files (stats: {extra.get('rows_outside_stages', '?')} rows fell "
            "outside every stage)."
        )
    vocabs = {f: fit_vocab(parts, f, n_hist, min_count) for f in fields}
    vocab_sizes = [len(vocabs[f]) + 1 for f in fields]
    pos_SxK = np.zeros((n_stages, len(tasks)), np.int64)
    oov_SxF = np.zeros((n_stages, len(fields)), np.int64)
    with StoreWriter(root, dataset, fields, vocab_sizes, tasks) as writer:
        arrays = [writer.new_stage(s.name, s.role, int(rows_S[i])) for i, s in enumerate(spans)]
        cursor_S = np.zeros(n_stages, np.int64)
        for path in tqdm(parts, desc=f"{dataset}: encode", unit="part", disable=not progress):
            df = pl.read_ipc(path).sort("stage", maintain_order=True)
            stage_N = df["stage"].to_numpy()
            x_NxF = np.empty((df.height, len(fields)), np.int32)
            for j, f in enumerate(fields):
                x_NxF[:, j] = encode(df[f], vocabs[f])
            y_NxK = np.empty((df.height, len(tasks)), np.uint8)
            for k, t in enumerate(tasks):
                y_NxK[:, k] = df[t].cast(pl.UInt8).to_numpy()
            bounds = np.searchsorted(stage_N, np.arange(n_stages + 1))
            for s in range(n_stages):
                a, b = int(bounds[s]), int(bounds[s + 1])
                if b == a:
                    continue
                c = int(cursor_S[s])
                arrays[s]["x"][c : c + b - a] = x_NxF[a:b]
                arrays[s]["y"][c : c + b - a] = y_NxK[a:b]
                cursor_S[s] += b - a
                pos_SxK[s] += y_NxK[a:b].sum(0, dtype=np.int64)
                oov_SxF[s] += (x_NxF[a:b] == OOV).sum(0, dtype=np.int64)
            del df, x_NxF, y_NxK
        for a in arrays:
            for m in a.values():
                m.flush()
        del arrays
        os.makedirs(os.path.join(writer.tmp, "vocab"))
        for f in fields:
            pl.DataFrame({f: vocabs[f]}).write_parquet(
                os.path.join(writer.tmp, "vocab", f"{f}.parquet")
            )
        writer.extra = {
            **extra,
            "oov_id": OOV,
            "min_count": int(min_count),
            "vocab_fit_on": [s.name for s in spans[:n_hist]],
            "vocab_files": "vocab/<field>.parquet: row i holds the raw value of id i + 1",
            "stage_days": {s.name: [s.start.isoformat(), s.end.isoformat()] for s in spans},
            "positive_rate": {
                s.name: {t: float(pos_SxK[i, k] / rows_S[i]) for k, t in enumerate(tasks)}
                for i, s in enumerate(spans)
            },
            "oov_rate": {
                s.name: {f: float(oov_SxF[i, j] / rows_S[i]) for j, f in enumerate(fields)}
                for i, s in enumerate(spans)
            },
        }
        fmap = writer.finish()
    logging.info(
        "%s: wrote %d samples in %d stages to %s (%s rows outside every stage)",
        dataset,
        int(rows_S.sum()),
        n_stages,
        root,
        extra.get("rows_outside_stages", "?"),
    )
    return fmap


def read_vocab(root: str, field: str) -> pl.Series:
    """The raw values of a field's ids 1..N, as written by `write_store`."""
    return pl.read_parquet(os.path.join(root, "vocab", f"{field}.parquet"))[field]
