"""A Taobao-format stream of our own: `UserBehavior.csv` with structure and drift, any size.

Writes the raw file the Taobao reader (`data/taobao.py`) reads: no header, 5 columns
`user_id,item_id,category_id,behavior_type,timestamp`, behaviour in {pv, buy, cart, fav}, Unix
seconds, days in Beijing time. Then `build` runs the real reader on it, so every line of the
reader (parsing, validation, spilling, grouping, vocabularies) is exercised at any size.

The world (seeded, no file needed):
- `synth_users` users, `synth_items` items, `synth_categories` categories; an item belongs to one
  category (category sizes Zipf); users' activity and items' popularity are Zipf.
- Every user has latent tastes P_u and a favourite category; every category a latent vector
  Q_c, every item Q_cat(i) + its own R_i. Affinity s = <P_u, Q_cat(i) + R_i> + b_i + b_u.
- An interaction is a pv line; with probabilities sigmoid(c_b + a_b s) it adds cart, fav and buy
  lines (buy more likely in the favourite category), and a second pv with `synth_repeat_pv`.
  Half of the interactions pick an item of the user's favourite category, half by popularity.
- Drift, every day: a fraction `synth_popularity_shift` of the item popularity ranking is
  permuted, tastes take an AR(1) step `synth_preference_drift`, and a fraction
  `synth_taste_switch` of users change favourite category.
- A share `synth_outside_share` of lines falls outside every stage (the real file has 0.06%).

Generation is chunked (`synth_chunk_rows` interactions at a time): memory is bounded for any
`synth_rows`. The file is written to a temporary name and renamed; a sidecar
`UserBehavior.csv.synth.json` records the parameters, and a file with other parameters is
regenerated.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from diet_jax.data import raw, taobao
from diet_jax.data.store import FeatureMap

KEYS = (
    "seed",
    "synth_rows",
    "synth_users",
    "synth_items",
    "synth_categories",
    "synth_latent_dim",
    "synth_zipf_exponent",
    "synth_popularity_shift",
    "synth_preference_drift",
    "synth_taste_switch",
    "synth_repeat_pv",
    "synth_outside_share",
    "synth_chunk_rows",
)
# Intercepts and slopes of cart, fav, buy given affinity s ~ N(0, ~1.5^2): about 6%, 3%, 2% of
# interactions, near the real file's line shares (cart 5.5%, fav 2.9%, buy 2.0%).
_INTERCEPT = np.array([-3.6, -4.3, -4.8])
_SLOPE = np.array([1.0, 0.8, 1.2])
_FAVOURITE_BUY_BONUS = 0.8


def check(cfg) -> None:
    """Rejects bad `data.synth_*` values with the key's name."""
    for key in ("synth_rows", "synth_users", "synth_items", "synth_categories", "synth_chunk_rows"):
        if int(cfg[key]) <= 0:
            raise ValueError(f"data.{key} must be positive, got {cfg[key]}.")
    if int(cfg.synth_categories) > int(cfg.synth_items):
        raise ValueError("data.synth_categories must not exceed data.synth_items.")
    for key in (
        "synth_popularity_shift",
        "synth_preference_drift",
        "synth_taste_switch",
        "synth_repeat_pv",
        "synth_outside_share",
    ):
        if not 0 <= float(cfg[key]) < 1:
            raise ValueError(f"data.{key} must lie in [0, 1), got {cfg[key]}.")


def _zipf_cdf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return np.cumsum(p / p.sum())


def _draw(cdf: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(size)), cdf.size - 1)


def _days(stages) -> list[datetime.date]:
    spans = raw.parse_stages(stages)
    first, last = min(s.start for s in spans), max(s.end for s in spans)
    return [first + datetime.timedelta(d) for d in range((last - first).days)]


class _World:
    """Users, items, categories and their latent state; `drift` moves it by one day."""

    def __init__(self, cfg, rng: np.random.Generator):
        u, i, c, r = cfg.synth_users, cfg.synth_items, cfg.synth_categories, cfg.synth_latent_dim
        s = float(cfg.synth_zipf_exponent)
        self.cfg = cfg
        # Items sorted by category; category sizes Zipf (at least one item each).
        size_C = 1 + np.floor((i - c) * np.diff(_zipf_cdf(c, s), prepend=0.0)).astype(np.int64)
        size_C[0] += i - size_C.sum()
        self.cat_start_C = np.concatenate([[0], np.cumsum(size_C)[:-1]])
        self.cat_size_C = size_C
        self.cat_I = np.repeat(np.arange(c), size_C)
        self.cat_ids_C = rng.permutation(c) + 1  # raw ids: arbitrary positive integers
        self.user_ids_U = rng.choice(10 * u, size=u, replace=False) + 1
        self.item_ids_I = rng.choice(10 * i, size=i, replace=False) + 1
        self.user_cdf, self.item_cdf = _zipf_cdf(u, s), _zipf_cdf(i, s)
        self.user_rank_U = rng.permutation(u)  # rank -> user
        self.item_rank_I = rng.permutation(i)  # rank -> item
        self.taste_UxR = rng.normal(0, 1 / np.sqrt(r), (u, r)).astype(np.float32)
        self.q_CxR = rng.normal(0, 1.0, (c, r)).astype(np.float32)
        self.r_IxR = rng.normal(0, 0.5, (i, r)).astype(np.float32)
        self.b_I = rng.normal(0, 0.5, i).astype(np.float32)
        self.b_U = rng.normal(0, 0.5, u).astype(np.float32)
        self.fav_U = self.cat_I[self.item_rank_I[_draw(self.item_cdf, u, rng)]]

    def drift(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        m = int(round(cfg.synth_popularity_shift * self.item_rank_I.size))
        if m > 1:
            pos = rng.choice(self.item_rank_I.size, size=m, replace=False)
            self.item_rank_I[pos] = self.item_rank_I[rng.permutation(pos)]
        rho = float(cfg.synth_preference_drift)
        noise = rng.normal(0, 1 / np.sqrt(self.taste_UxR.shape[1]), self.taste_UxR.shape)
        self.taste_UxR = (np.sqrt(1 - rho) * self.taste_UxR + np.sqrt(rho) * noise).astype(
            np.float32
        )
        switch = np.flatnonzero(rng.random(self.fav_U.size) < cfg.synth_taste_switch)
        self.fav_U[switch] = self.cat_I[self.item_rank_I[_draw(self.item_cdf, switch.size, rng)]]

    def interactions(self, n: int, rng: np.random.Generator):
        """n (user, item) interactions: user index, item index, behaviour flags [n, 3]."""
        user = self.user_rank_U[_draw(self.user_cdf, n, rng)]
        item = self.item_rank_I[_draw(self.item_cdf, n, rng)]
        in_fav = rng.random(n) < 0.5
        fav = self.fav_U[user[in_fav]]
        item[in_fav] = self.cat_start_C[fav] + (
            rng.random(in_fav.sum()) * self.cat_size_C[fav]
        ).astype(np.int64)
        in_fav = self.cat_I[item] == self.fav_U[user]
        s = (
            np.einsum(
                "nr,nr->n", self.taste_UxR[user], self.q_CxR[self.cat_I[item]] + self.r_IxR[item]
            )
            + self.b_I[item]
            + self.b_U[user]
        )
        logit_Nx3 = _INTERCEPT + _SLOPE * s[:, None]
        logit_Nx3[:, 2] += _FAVOURITE_BUY_BONUS * in_fav
        flags_Nx3 = rng.random((n, 3)) < 1 / (1 + np.exp(-logit_Nx3))
        return user, item, flags_Nx3


def _lines(world: _World, n: int, day_start: int, rng: np.random.Generator, cfg) -> pl.DataFrame:
    """The raw lines of n interactions on one day: pv, a repeated pv, then cart/fav/buy."""
    user, item, flags = world.interactions(n, rng)
    t0 = day_start + rng.integers(0, 86_400 - 3_600, n)  # every line of a group on its day
    repeat = rng.random(n) < cfg.synth_repeat_pv
    parts = [(np.ones(n, bool), "pv", 0), (repeat, "pv", 60)]
    parts += [(flags[:, k], b, 120 * (k + 1)) for k, b in enumerate(("cart", "fav", "buy"))]
    cols = {"u": [], "i": [], "b": [], "t": [], "order": []}
    for mask, behaviour, lag in parts:
        idx = np.flatnonzero(mask)
        cols["u"].append(user[idx])
        cols["i"].append(item[idx])
        cols["b"].append(np.full(idx.size, taobao.BEHAVIORS.index(behaviour), np.int8))
        cols["t"].append(t0[idx] + lag + rng.integers(0, 60, idx.size))
        cols["order"].append(idx)
    order = np.argsort(np.concatenate(cols["order"]), kind="stable")  # a group's lines together
    item_all = np.concatenate(cols["i"])[order]
    return pl.DataFrame(
        {
            "user_id": world.user_ids_U[np.concatenate(cols["u"])[order]],
            "item_id": world.item_ids_I[item_all],
            "category_id": world.cat_ids_C[world.cat_I[item_all]],
            "behavior_type": np.asarray(taobao.BEHAVIORS)[np.concatenate(cols["b"])[order]],
            "timestamp": np.concatenate(cols["t"])[order],
        }
    )


def params(cfg) -> dict:
    """The generator's parameters (what the sidecar records)."""
    out = {k: cfg[k] for k in KEYS}
    out["stages"] = [list(s) for s in cfg.stages]
    out["utc_offset_hours"] = float(cfg.utc_offset_hours)
    return json.loads(json.dumps(out))


def write_csv(cfg, path: str, *, progress: bool = True) -> dict:
    """Writes `synth_rows` lines of UserBehavior.csv at `path` (atomically); returns counts."""
    check(cfg)
    rng_world = np.random.default_rng([int(cfg.seed), 0])
    world = _World(cfg, rng_world)
    days = _days(cfg.stages)
    total = int(cfg.synth_rows)
    # Days grow a little (a live shop): weights 1 + 2% per day.
    w = 1 + 0.02 * np.arange(len(days))
    quota = np.floor(total * w / w.sum()).astype(np.int64)
    quota[-1] += total - quota.sum()
    mean_lines = 1 + cfg.synth_repeat_pv + 0.11  # pv + repeat + cart/fav/buy (about 11%)
    tmp = f"{path}.tmp-{os.getpid()}"
    counts = dict.fromkeys(taobao.BEHAVIORS, 0)
    bar = tqdm(total=total, desc="taobao-format: write", unit="line", disable=not progress)
    try:
        with open(tmp, "wb") as fh:
            for d, day in enumerate(days):
                if d > 0:
                    world.drift(np.random.default_rng([int(cfg.seed), 1, d]))
                start = raw.epoch_seconds(day, cfg.utc_offset_hours)
                left, c = int(quota[d]), 0
                while left > 0:
                    rng = np.random.default_rng([int(cfg.seed), 2, d, c])
                    n = min(int(cfg.synth_chunk_rows), max(16, int(left / mean_lines) + 16))
                    df = _lines(world, n, start, rng, cfg).head(left)
                    df = _outside(df, cfg, rng)
                    for b, k in df["behavior_type"].value_counts().iter_rows():
                        counts[b] += int(k)
                    df.write_csv(fh, include_header=False)
                    left -= df.height
                    bar.update(df.height)
                    c += 1
        os.replace(tmp, path)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return counts


def _outside(df: pl.DataFrame, cfg, rng: np.random.Generator) -> pl.DataFrame:
    """Moves a share of the lines out of every stage (year 2037, or a negative time)."""
    k = rng.binomial(df.height, float(cfg.synth_outside_share))
    if k == 0:
        return df
    ts = df["timestamp"].to_numpy().copy()
    pos = rng.choice(df.height, size=k, replace=False)
    ts[pos] = np.where(rng.random(k) < 0.5, 2_136_000_000, -86_400)
    return df.with_columns(timestamp=pl.Series(ts))


def ensure_csv(cfg, *, progress: bool = True) -> str:
    """`<data_dir>/UserBehavior.csv`, generated unless a file with these parameters is there."""
    folder = os.path.abspath(os.path.expanduser(cfg.data_dir or "."))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, taobao.FILE)
    sidecar = path + ".synth.json"
    want = params(cfg)
    if os.path.exists(path) and os.path.exists(sidecar):
        with open(sidecar) as f:
            if json.load(f).get("params") == want:
                return path
    counts = write_csv(cfg, path, progress=progress)
    with open(sidecar + ".tmp", "w") as f:
        json.dump({"params": want, "lines": counts}, f, indent=1)
    os.replace(sidecar + ".tmp", sidecar)
    return path


def build(data_cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Generates (or finds) the raw file, then reads it with the real Taobao reader.

    `data.data_dir` "" puts the raw file in `<root>/../raw` (next to the store).
    """
    cfg = data_cfg.copy_and_resolve_references()
    if not cfg.data_dir:
        cfg.data_dir = os.path.join(os.path.dirname(os.path.abspath(root)), "raw")
    ensure_csv(cfg, progress=progress)
    return taobao.build(cfg, root, progress=progress)
