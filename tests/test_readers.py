"""Real-dataset readers on small raw files written here in the published formats, quirks included.

Each reader's store is compared with a brute-force Python rebuild of the same samples, labels and
vocabularies from the rows the test wrote; malformed files must fail naming file, line and column
and leave nothing behind.
"""

import datetime
import hashlib
import os
import zipfile

import numpy as np
import polars as pl
import pytest
from conftest import load_config

from diet_jax.data import kuairand, movielens, prepare, raw, taobao, tmall
from diet_jax.data.store import StageStore

BJ = 8 * 3600


def _bj(y, m, d, h=0, mi=0, s=0):
    """Unix seconds of a Beijing (UTC+8) wall-clock time."""
    return int(datetime.datetime(y, m, d, h, mi, s, tzinfo=datetime.UTC).timestamp()) - BJ


def _spans(config):
    return raw.parse_stages(config.data.stages)


def _codes(stage_rows, n_hist, fields, min_count=1):
    """Brute-force vocabularies: sorted values seen >= min_count times in historical stages."""
    vocab = []
    for j in range(len(fields)):
        counts = {}
        for s in range(n_hist):
            for row in stage_rows[s]:
                v = row[j]
                if v is not None:
                    counts[v] = counts.get(v, 0) + 1
        kept = sorted(v for v, c in counts.items() if c >= min_count)
        vocab.append({v: i + 1 for i, v in enumerate(kept)})
    return vocab


def _check_store(root, spans, expected, fields, tasks, min_count=1):
    """Compares every stage's (x, y) rows, as multisets, with the brute-force samples.

    `expected[s]` is a list of (field values..., labels...) tuples of stage s.
    """
    store = StageStore(root)
    fmap = store.feature_map
    n_hist = sum(s.role == "historical" for s in spans)
    fields_only = [[r[: len(fields)] for r in rows] for rows in expected]
    vocab = _codes(fields_only, n_hist, fields, min_count)
    assert fmap.fields == tuple(fields) and fmap.tasks == tuple(tasks)
    assert fmap.vocab_sizes == tuple(len(v) + 1 for v in vocab)
    assert [(s.name, s.role) for s in fmap.stages] == [(s.name, s.role) for s in spans]
    for s, span in enumerate(spans):
        stage = store.stage(span.name)
        got = np.concatenate([stage.x_NxF, stage.y_NxK.astype(np.int32)], axis=1)
        want = np.array(
            [
                [vocab[j].get(r[j], 0) for j in range(len(fields))]
                + [int(b) for b in r[len(fields) :]]
                for r in expected[s]
            ],
            dtype=np.int32,
        ).reshape(-1, len(fields) + len(tasks))
        assert got.shape == want.shape, span.name
        np.testing.assert_array_equal(
            got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], err_msg=span.name
        )
    for j, f in enumerate(fields):  # vocabulary files: row i is the raw value of id i + 1
        assert len(raw.read_vocab(root, f)) == len(vocab[j])
    return store


def _stage_of(key, bounds):
    for s, (a, b) in enumerate(bounds):
        if a <= key < b:
            return s
    return -1


def _assert_clean(folder, root_name="store"):
    """A failed build leaves neither the store nor its temporary or spill folders."""
    assert not [n for n in os.listdir(folder) if n.startswith(root_name)], os.listdir(folder)


# ------------------------------------------------------------------------------------- stages


def test_assign_stages_half_open_and_outside():
    starts, ends = [10, 20, 25], [20, 25, 30]
    key = np.array([9, 10, 19, 20, 24, 25, 29, 30, -5])
    np.testing.assert_array_equal(
        raw.assign_stages(key, starts, ends), [-1, 0, 0, 1, 1, 2, 2, -1, -1]
    )
    # A gap between stages is outside as well.
    np.testing.assert_array_equal(
        raw.assign_stages(np.array([15, 22]), [10, 25], [20, 30]), [0, -1]
    )


@pytest.mark.parametrize(
    "stages, match",
    [
        ((("a", "historical", "2020-01-02", "2020-01-01"),), "not before"),
        (
            (
                ("a", "historical", "2020-01-01", "2020-01-03"),
                ("b", "subsequent", "2020-01-02", "2020-01-04"),
            ),
            "overlap",
        ),
        (
            (
                ("a", "historical", "2020-01-01", "2020-01-02"),
                ("b", "validation", "2020-01-02", "2020-01-03"),
                ("c", "subsequent", "2020-01-03", "2020-01-04"),
                ("d", "test", "2020-01-04", "2020-01-05"),
            ),
            "roles",
        ),
        ((("a", "historical", "2020/01/01", "2020-01-02"),), "YYYY-MM-DD"),
    ],
)
def test_bad_stage_plans_are_rejected(stages, match):
    with pytest.raises(ValueError, match=match):
        raw.parse_stages(stages)


def test_epoch_seconds_uses_the_local_midnight():
    day = datetime.date(2017, 11, 25)
    assert raw.epoch_seconds(day, 8) == 1511539200  # the reference's 11/25 boundary
    assert raw.epoch_seconds(datetime.date(2017, 12, 4), 8) == 1512316800


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name, batch, ratio",
    [("taobao", 4096, 0.0168), ("tmall", 1024, 0.0139), ("kuairand", 512, 0.015)],
)
def test_configs_have_the_papers_batch_sizes_ratios_and_stages(name, batch, ratio):
    c = load_config(name, None)
    assert c.train.batch_size == batch and c.ratio == pytest.approx(ratio)
    assert c.data.source == name and c.data.store_dir == "" and "seed" not in c.data
    spans = _spans(c)
    assert sum(s.role == "historical" for s in spans) == (2 if name == "kuairand" else 3)
    tiny = load_config(name, "tiny")
    assert tiny.data.chunk_bytes < 1 << 16 and tiny.train.batch_size < batch
    with pytest.raises(ValueError, match="variant"):
        load_config(name, "huge")


def test_paper_stage_days():
    days = {
        s.name: (s.start.isoformat(), s.end.isoformat())
        for s in _spans(load_config("taobao", None))
    }
    assert days["stage_1"] == ("2017-11-25", "2017-11-27") and days["test"] == (
        "2017-12-03",
        "2017-12-04",
    )
    days = {
        s.name: (s.start.isoformat(), s.end.isoformat()) for s in _spans(load_config("tmall", None))
    }
    assert days["subsequent"] == ("2014-08-01", "2014-09-01") and days["test"] == (
        "2014-09-02",
        "2014-09-03",
    )
    days = {
        s.name: (s.start.isoformat(), s.end.isoformat())
        for s in _spans(load_config("kuairand", None))
    }
    assert days["stage_1"] == ("2022-04-16", "2022-04-23") and days["validation"] == (
        "2022-05-07",
        "2022-05-08",
    )


@pytest.mark.parametrize(
    "name, missing",
    [
        ("taobao", "UserBehavior.csv"),
        ("tmall", "user_log_format1.csv"),
        ("kuairand", "log_standard_4_08_to_4_21_1k.csv"),
    ],
)
def test_missing_raw_file_says_what_where_and_how(tmp_path, name, missing):
    c = load_config(name, None)
    c.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        prepare.prepare(c, str(tmp_path / "work"))
    msg = str(err.value)
    assert missing in msg and str(tmp_path / "nowhere") in msg and "data_dir" in msg
    assert "http" in msg  # where to get it
    assert not os.path.exists(tmp_path / "work" / "data")


# ------------------------------------------------------------------------------------- Taobao


def _taobao_rows(rng, n=1200):
    """Random in-window rows plus the quirks of the real file."""
    start, end = _bj(2017, 11, 25), _bj(2017, 12, 4)
    rows = [
        (
            int(rng.integers(1, 40)),
            int(rng.integers(1, 150)),
            0,
            str(rng.choice(["pv", "pv", "pv", "cart", "fav", "buy"])),
            int(rng.integers(start, end)),
        )
        for _ in range(n)
    ]
    rows = [(u, i, 1000 + i % 17, b, t) for u, i, _, b, t in rows]
    rows += [
        (7, 500, 9, "pv", _bj(2017, 11, 25)),  # first second of stage_1
        (7, 500, 9, "cart", _bj(2017, 11, 25, 9, 30)),  # same group: cart, hour stays 0
        (7, 500, 9, "buy", _bj(2017, 11, 26, 23, 59, 59)),  # next day: a new group
        (7, 500, 9, "buy", _bj(2017, 11, 26, 23, 59, 59)),  # exact duplicate row
        (8, 501, 9, "pv", _bj(2017, 11, 27, 4)),  # 11/26 20:00 UTC: stage_2 in Beijing time
        (8, 502, 8, "fav", _bj(2017, 11, 25) - 1),  # 11/24 23:59:59: outside
        (8, 503, 8, "pv", -2134949234),  # negative time: outside
        (8, 504, 8, "pv", 2122867355),  # 2037: outside
        (8, 505, 8, "pv", _bj(2017, 12, 4)),  # 12/04 00:00: outside
        (9, 99999, 8, "buy", _bj(2017, 12, 3, 23, 59, 59)),  # test-only item: OOV
        (12345, 501, 9, "pv", _bj(2017, 12, 2, 12)),  # validation-only user: OOV
    ]
    return rows


def _write_csv(path, lines, header=None, crlf=False):
    eol = "\r\n" if crlf else "\n"
    with open(path, "w", newline="") as f:
        if header:
            f.write(header + eol)
        f.write(eol.join(lines) + eol)


def _taobao_expected(rows, spans):
    bounds = [(raw.epoch_seconds(s.start, 8), raw.epoch_seconds(s.end, 8)) for s in spans]
    groups, outside = {}, 0
    for u, i, c, b, t in rows:
        s = _stage_of(t, bounds)
        if s < 0:
            outside += 1
            continue
        key = (s, u, i, (t + BJ) // 86400)
        g = groups.setdefault(key, {"c": c, "t": t, "cart": 0, "fav": 0, "buy": 0})
        g["c"], g["t"] = min(g["c"], c), min(g["t"], t)
        if b != "pv":
            g[b] = 1
    expected = [[] for _ in spans]
    for (s, u, i, _), g in groups.items():
        hour = ((g["t"] + BJ) % 86400) // 3600
        expected[s].append((u, i, g["c"], hour, g["cart"], g["fav"], g["buy"]))
    return expected, outside


@pytest.mark.parametrize("crlf", [False, True])
def test_taobao_matches_a_brute_force_rebuild(tmp_path, crlf):
    rows = _taobao_rows(np.random.default_rng(0))
    data = tmp_path / "raw"
    data.mkdir()
    _write_csv(data / taobao.FILE, [",".join(map(str, r)) for r in rows], crlf=crlf)
    c = load_config("taobao", "tiny")
    c.data.data_dir = str(data)
    assert os.path.getsize(data / taobao.FILE) > 2 * c.data.partition_bytes  # several partitions
    root = str(tmp_path / "store")
    fmap = taobao.build(c.data, root, progress=False)
    spans = _spans(c)
    expected, outside = _taobao_expected(rows, spans)
    store = _check_store(root, spans, expected, taobao.FIELDS, taobao.TASKS)
    assert (
        fmap.extra["rows_read"] == len(rows) and fmap.extra["rows_outside_stages"] == outside == 4
    )
    assert sum(fmap.extra["stage_raw_rows"].values()) == len(rows) - 4
    # The hand-made groups: (7, 500) on 11/25 has cart and no buy; hour 0 is the first event's.
    x, y = np.asarray(store.stage("stage_1").x_NxF), np.asarray(store.stage("stage_1").y_NxK)
    items = raw.read_vocab(root, "item_id").to_list()
    hours = raw.read_vocab(root, "hour").to_list()
    users = raw.read_vocab(root, "user_id").to_list()
    mine = (x[:, 0] == users.index(7) + 1) & (x[:, 1] == items.index(500) + 1)
    assert sorted(map(tuple, y[mine].tolist())) == [(0, 0, 1), (1, 0, 0)]
    assert set(x[mine, 3].tolist()) == {hours.index(0) + 1, hours.index(23) + 1}
    assert 99999 not in items and 12345 not in users  # seen only after the historical stages
    assert store.feature_map.extra["oov_rate"]["validation"]["user_id"] > 0
    assert not [n for n in os.listdir(tmp_path) if ".spill-" in n or ".tmp-" in n]


def test_taobao_min_count_sends_rare_values_to_oov(tmp_path):
    rows = _taobao_rows(np.random.default_rng(1), n=600)
    data = tmp_path / "raw"
    data.mkdir()
    _write_csv(data / taobao.FILE, [",".join(map(str, r)) for r in rows])
    c = load_config("taobao", "tiny")
    c.data.data_dir, c.data.min_count = str(data), 3
    root = str(tmp_path / "store")
    taobao.build(c.data, root, progress=False)
    spans = _spans(c)
    expected, _ = _taobao_expected(rows, spans)
    _check_store(root, spans, expected, taobao.FIELDS, taobao.TASKS, min_count=3)


def test_taobao_store_is_deterministic(tmp_path):
    rows = _taobao_rows(np.random.default_rng(7), n=500)
    data = tmp_path / "raw"
    data.mkdir()
    _write_csv(data / taobao.FILE, [",".join(map(str, r)) for r in rows])
    c = load_config("taobao", "tiny")
    c.data.data_dir = str(data)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert taobao.build(c.data, a, progress=False) == taobao.build(c.data, b, progress=False)
    for s in StageStore(a).feature_map.stages:
        np.testing.assert_array_equal(
            StageStore(a).stage(s.name).x_NxF, StageStore(b).stage(s.name).x_NxF
        )
        np.testing.assert_array_equal(
            StageStore(a).stage(s.name).y_NxK, StageStore(b).stage(s.name).y_NxK
        )


BAD_TAOBAO = [
    ("1,2,3,pv", None, "expected 5 columns, found 4"),
    ("1,2,3,pv,1511540000,7", None, "expected 5 columns, found 6"),
    ("1,x2,3,pv,1511540000", "column 2 (item_id)", "expected an integer"),
    ("1,2,,pv,1511540000", "column 3 (category_id)", "empty value"),
    ("1,2,3,click,1511540000", "column 4 (behavior_type)", "expected one of"),
    ("1,2,3,pv,1.5e9", "column 5 (timestamp)", "expected an integer"),
    ("", None, "expected 5 columns, found 1"),
]


@pytest.mark.parametrize("bad, column, message", BAD_TAOBAO)
def test_taobao_malformed_line_is_named_and_nothing_is_left(tmp_path, bad, column, message):
    lines = [f"{u},{u + 1},{u + 2},pv,{1511540000 + u}" for u in range(1, 400)]
    lines.insert(249, bad)  # line 250: past the first block of 4096 bytes
    data = tmp_path / "raw"
    data.mkdir()
    _write_csv(data / taobao.FILE, lines)
    c = load_config("taobao", "tiny")
    c.data.data_dir = str(data)
    with pytest.raises(raw.RawFormatError) as err:
        taobao.build(c.data, str(tmp_path / "store"), progress=False)
    e = err.value
    assert e.line == 250 and e.column == column and e.path.endswith(taobao.FILE)
    assert message in str(e) and f"{taobao.FILE}, line 250" in str(e)
    _assert_clean(tmp_path)


# ------------------------------------------------------------------------------------- Tmall

TMALL_HEADER = "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type"


def _tmall_files(folder, rng, n=900):
    days = ["0511", "0531", "601", "0715", "0731", "0801", "0831", "0901", "0902"]
    log = []
    for _ in range(n):
        u, i = int(rng.integers(1, 30)), int(rng.integers(1, 120))
        brand = "" if i % 11 == 0 else str(3000 + i % 13)  # empty brand ids
        log.append(
            (
                u,
                i,
                100 + i % 9,
                200 + i % 7,
                brand,
                str(rng.choice(days)),
                int(rng.choice([0, 0, 1, 2, 3])),
            )
        )
    log += [
        (1, 5, 105, 205, "", "1111", 2),  # Double 11: outside
        (1, 5, 105, 205, "3005", "1020", 0),  # October: outside
        (1, 5, 105, 205, "3005", "0430", 0),  # before the first stage
        (1, 5, 105, 205, "3005", "0903", 0),  # after the test day
        (2, 7, 107, 207, "3007", "0520", 1),  # cart ...
        (2, 7, 107, 207, "3007", "0520", 1),  # ... duplicated
        (2, 7, 107, 207, "", "0520", 3),  # and favourite, brand empty on this row only
        (2, 7, 107, 207, "3099", "0520", 0),  # another brand in the group: the smallest counts
        (77, 8, 108, 208, "3008", "0520", 2),  # user missing from user_info
    ]
    _write_csv(folder / tmall.LOG, [",".join(map(str, r)) for r in log], header=TMALL_HEADER)
    users = [(u, "" if u % 5 == 0 else u % 9, "" if u % 7 == 0 else u % 3) for u in range(1, 30)]
    users.append((3, 6, 1))  # listed twice: the first row counts
    _write_csv(
        folder / tmall.USERS,
        [",".join(map(str, r)) for r in users],
        header="user_id,age_range,gender",
    )
    return log, users


def _tmall_expected(log, users, spans):
    key = lambda d: d.month * 100 + d.day  # noqa: E731
    bounds = [(key(s.start), key(s.end)) for s in spans]
    info = {}
    for u, a, g in users:
        info.setdefault(u, (0 if a == "" else a, 2 if g == "" else g))
    groups, outside = {}, 0
    for u, i, cat, seller, brand, ts, action in log:
        s = _stage_of(int(ts), bounds)
        if s < 0:
            outside += 1
            continue
        g = groups.setdefault(
            (s, u, i, int(ts)), {"cat": cat, "seller": seller, "brand": None, 2: 0, 3: 0, 1: 0}
        )
        g["cat"], g["seller"] = min(g["cat"], cat), min(g["seller"], seller)
        if brand != "":
            g["brand"] = int(brand) if g["brand"] is None else min(g["brand"], int(brand))
        if action:
            g[action] = 1
    expected = [[] for _ in spans]
    for (s, u, i, ts), g in groups.items():
        age, gender = info.get(u, (0, 2))
        weekday = datetime.date(2014, ts // 100, ts % 100).isoweekday()
        expected[s].append(
            (u, i, g["cat"], g["seller"], g["brand"], age, gender, weekday, g[2], g[3], g[1])
        )
    return expected, outside


def test_tmall_matches_a_brute_force_rebuild(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    log, users = _tmall_files(data, np.random.default_rng(2))
    c = load_config("tmall", "tiny")
    c.data.data_dir = str(data)
    root = str(tmp_path / "store")
    fmap = tmall.build(c.data, root, progress=False)
    spans = _spans(c)
    expected, outside = _tmall_expected(log, users, spans)
    store = _check_store(root, spans, expected, tmall.FIELDS, tmall.TASKS)
    assert fmap.extra["rows_outside_stages"] == outside == 4
    # 2014-05-20 was a Tuesday; user 2's group on 05/20 is cart + favourite, no purchase.
    x, y = np.asarray(store.stage("stage_1").x_NxF), np.asarray(store.stage("stage_1").y_NxK)
    users_v, items_v = (
        raw.read_vocab(root, "user_id").to_list(),
        raw.read_vocab(root, "item_id").to_list(),
    )
    mine = (x[:, 0] == users_v.index(2) + 1) & (x[:, 1] == items_v.index(7) + 1)
    assert mine.sum() >= 1
    weekday_v = raw.read_vocab(root, "weekday").to_list()
    row = [k for k in np.flatnonzero(mine) if x[k, 7] == weekday_v.index(2) + 1]
    assert len(row) == 1 and y[row[0]].tolist() == [0, 1, 1]
    assert raw.read_vocab(root, "brand_id").null_count() == 0  # empty brand = OOV, not a value


@pytest.mark.parametrize(
    "bad, line, column, message",
    [
        ("1,2,3,4,5,0520,7", 301, "column 7 (action_type)", "action type"),
        ("1,2,3,4,5,1340,0", 301, "column 6 (time_stamp)", "mmdd"),
        ("1,2,3,4,5,0230,0", 301, "column 6 (time_stamp)", "mmdd"),
        ("1,2,3,4,5,0520", 301, None, "expected 7 columns, found 6"),
        ("1,2,x,4,5,0520,0", 301, "column 3 (cat_id)", "integer"),
    ],
)
def test_tmall_malformed_line_is_named(tmp_path, bad, line, column, message):
    data = tmp_path / "raw"
    data.mkdir()
    lines = [f"{u},{u},1,1,,0520,0" for u in range(1, 400)]
    lines.insert(line - 2, bad)  # the header is line 1
    _write_csv(data / tmall.LOG, lines, header=TMALL_HEADER)
    _write_csv(data / tmall.USERS, ["1,2,1"], header="user_id,age_range,gender")
    c = load_config("tmall", "tiny")
    c.data.data_dir = str(data)
    with pytest.raises(raw.RawFormatError) as err:
        tmall.build(c.data, str(tmp_path / "store"), progress=False)
    assert (err.value.line, err.value.column) == (line, column) and message in str(err.value)
    _assert_clean(tmp_path)


def test_tmall_wrong_header_is_line_1(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    _write_csv(
        data / tmall.LOG, ["1,2,3,4,5,0520,0"], header=TMALL_HEADER.replace("seller_id", "merchant")
    )
    _write_csv(data / tmall.USERS, ["1,2,1"], header="user_id,age_range,gender")
    c = load_config("tmall", "tiny")
    c.data.data_dir = str(data)
    with pytest.raises(
        raw.RawFormatError, match=r"line 1: header .* lacks column\(s\) \['seller_id'\]"
    ):
        tmall.build(c.data, str(tmp_path / "store"), progress=False)


# ------------------------------------------------------------------------------------- KuaiRand

KR_LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)
KR_USER_HEADER = (
    "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,"
    "follow_user_num,follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,"
    "friend_user_num_range,register_days,register_days_range,"
    + ",".join(f"onehot_feat{k}" for k in range(18))
)
KR_VIDEO_HEADER = (
    "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
    "server_width,server_height,music_id,music_type,tag"
)


def _kr_files(folder, rng, n=500):
    def log_rows(dates):
        rows = []
        for _ in range(n):
            d = int(rng.choice(dates))
            click, like, lv = (int(v) for v in rng.integers(0, 2, 3))
            hm = int(rng.integers(0, 24)) * 100 + int(rng.integers(0, 60))
            rows.append(
                [
                    int(rng.integers(0, 12)),
                    int(rng.integers(0, 60)),
                    d,
                    hm,
                    1650000000000 + d,
                    click,
                    like,
                    0,
                    0,
                    0,
                    0,
                    lv,
                    1000,
                    2000,
                    0,
                    0,
                    0,
                    0,
                    int(rng.integers(0, 4)),
                ]
            )
        return rows

    early = log_rows([20220408, 20220415, 20220416, 20220420, 20220422])
    late = log_rows([20220422, 20220423, 20220429, 20220430, 20220506, 20220507, 20220508])
    late += [late[0], late[0]]  # exact duplicates are kept
    for name, rows in zip(kuairand.LOGS, (early, late), strict=True):
        _write_csv(folder / name, [",".join(map(str, r)) for r in rows], header=KR_LOG_HEADER)
    degrees = ["high_active", "full_active", "middle_active", "UNKNOWN"]
    users = []
    for u in range(0, 11):  # user 11 has no features
        users.append(
            [
                u,
                degrees[u % 4],
                u % 2,
                -124 if u % 3 else 1,
                u % 2,
                5,
                '"(0,10]"',
                7,
                '"[1k,5k)"',
                1,
                '"(0,5]"' if u % 2 else '""',
                800,
                '"730+"',
            ]
            + [u % 3] * 18
        )
    _write_csv(
        folder / kuairand.USERS, [",".join(map(str, r)) for r in users], header=KR_USER_HEADER
    )
    videos = []
    for v in range(0, 58):  # videos 58, 59 have no features
        tag = '"12,65"' if v % 3 == 0 else ("" if v % 3 == 1 else str(v % 5))
        upload_dt = "" if v % 10 == 0 else "2022-04-01"
        duration = "" if v % 4 == 0 else "12000.0"
        videos.append(
            [
                v,
                1000 + v % 6,
                "AD" if v % 9 == 0 else "NORMAL",
                upload_dt,
                "ShortImport" if v % 2 else "Web",
                "public",
                duration,
                720,
                1280,
                5,
                v % 3 if v % 8 else "",
                tag,
            ]
        )
    _write_csv(
        folder / kuairand.VIDEOS, [",".join(map(str, r)) for r in videos], header=KR_VIDEO_HEADER
    )
    # Present but never read: a malformed statistics file and the random log.
    _write_csv(folder / "video_features_statistic_1k.csv", ["garbage"], header="video_id,x")
    _write_csv(folder / "log_random_4_22_to_5_08_1k.csv", ["garbage"], header="nope")
    return early + late, users, videos


def _kr_expected(log, users, videos, spans):
    bounds = [(raw.date_key(s.start), raw.date_key(s.end)) for s in spans]
    missing = lambda v: None if str(v).strip('"') in ("", "UNKNOWN", "-124") else str(v).strip('"')  # noqa: E731
    uinfo = {u[0]: tuple(missing(u[k]) for k in (1, 2, 3, 4, 6, 8, 10, 12)) for u in users}
    vinfo = {}
    for v in videos:
        tag = str(v[11]).strip('"').split(",")[0]
        vinfo[v[0]] = (v[1], missing(v[2]), missing(v[4]), missing(v[10]), missing(tag))
    expected, outside = [[] for _ in spans], 0
    for r in log:
        s = _stage_of(r[2], bounds)
        if s < 0:
            outside += 1
            continue
        fields = (
            r[0],
            r[1],
            r[18],
            r[3] // 100,
            *uinfo.get(r[0], (None,) * 8),
            *vinfo.get(r[1], (None,) * 5),
        )
        expected[s].append((*fields, r[5], r[6], r[11]))
    return expected, outside


def test_kuairand_matches_a_brute_force_rebuild(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    log, users, videos = _kr_files(data, np.random.default_rng(3))
    c = load_config("kuairand", "tiny")
    c.data.data_dir = str(data)
    root = str(tmp_path / "store")
    fmap = kuairand.build(c.data, root, progress=False)
    spans = _spans(c)
    expected, outside = _kr_expected(log, users, videos, spans)
    assert outside > 0
    _check_store(root, spans, expected, kuairand.FIELDS, kuairand.TASKS)
    assert fmap.num_fields == 17 and fmap.extra["rows_outside_stages"] == outside
    assert sum(fmap.extra["rows_read_per_file"].values()) == len(log)
    # The -124 sentinel and UNKNOWN are missing values (OOV), never vocabulary entries.
    assert "-124" not in raw.read_vocab(root, "is_live_streamer").to_list()
    assert "UNKNOWN" not in raw.read_vocab(root, "user_active_degree").to_list()
    assert set(raw.read_vocab(root, "first_tag").to_list()) <= {"12", "0", "1", "2", "3", "4"}


def test_kuairand_bad_label_is_named(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    _kr_files(data, np.random.default_rng(4), n=200)
    path = data / kuairand.LOGS[1]
    lines = path.read_text().splitlines()
    cols = lines[150].split(",")
    cols[5] = "2"  # is_click
    lines[150] = ",".join(cols)
    path.write_text("\n".join(lines) + "\n")
    c = load_config("kuairand", "tiny")
    c.data.data_dir = str(data)
    with pytest.raises(raw.RawFormatError) as err:
        kuairand.build(c.data, str(tmp_path / "store"), progress=False)
    assert (err.value.line, err.value.column) == (151, "column 6 (is_click)")
    assert kuairand.LOGS[1] in str(err.value) and "0/1 label" in str(err.value)
    _assert_clean(tmp_path)


# ------------------------------------------------------------------------------------- MovieLens

ML_TIMES = [  # (UTC month start, day count)
    (datetime.datetime(1997, m, 1, tzinfo=datetime.UTC), 28) for m in (9, 10, 11, 12)
] + [(datetime.datetime(1998, m, 1, tzinfo=datetime.UTC), 28) for m in (1, 2, 3, 4, 5)]


def _ml_zip(folder, rng, n=400):
    inter = []
    for _ in range(n):
        month, days = ML_TIMES[int(rng.integers(0, len(ML_TIMES)))]
        t = int(month.timestamp()) + int(rng.integers(0, days * 86400))
        inter.append(
            (
                str(int(rng.integers(1, 25))),
                str(int(rng.integers(1, 40))),
                int(rng.integers(1, 6)),
                t,
            )
        )
    first = int(ML_TIMES[0][0].timestamp())
    inter += [("1", "1", 5, first), ("1", "1", 5, first - 1)]  # 1997-08-31 23:59:59: outside
    users = [
        (str(u), str(18 + u), "MF"[u % 2], ["student", "other", "writer"][u % 3], f"{u:02d}{u}1{u}")
        for u in range(1, 24)
    ]  # user 24 has no features
    users.append(("5", "99", "F", "x", "T8H1N"))  # repeated: the first row counts
    items = [
        (
            str(i),
            f'"Title" {i}',
            "V" if i == 3 else str(1990 + i % 7),
            "" if i == 4 else ["Animation Children's Comedy", "Drama", "Sci-Fi Thriller"][i % 3],
        )
        for i in range(1, 39)
    ]
    text = {
        "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter),
        "user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join("\t".join(r) + "\n" for r in users),
        "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join("\t".join(r) + "\n" for r in items),
    }
    path = folder / movielens.WHEEL
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("recbole/__init__.py", "")
        for suffix, body in text.items():
            z.writestr(movielens.MEMBER.format(suffix), body)
    return path, inter, users, items


def _ml_config(folder, path):
    c = load_config("movielens", "tiny")
    c.data.data_dir = str(folder)
    c.data.wheel_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return c


def test_movielens_small_zip_matches_a_brute_force_rebuild(tmp_path):
    path, inter, users, items = _ml_zip(tmp_path, np.random.default_rng(5))
    c = _ml_config(tmp_path, path)
    root = str(tmp_path / "store")
    fmap = movielens.build(c.data, root, progress=False)
    spans = _spans(c)
    bounds = [(raw.epoch_seconds(s.start), raw.epoch_seconds(s.end)) for s in spans]
    uinfo, iinfo = {}, {}
    for u, age, g, occ, z in users:
        uinfo.setdefault(u, (age, g, occ, z[:3]))
    for i, _, year, cls in items:
        iinfo.setdefault(i, (year, cls.split(" ")[0] if cls else None))
    expected, outside = [[] for _ in spans], 0
    for u, i, r, t in inter:
        s = _stage_of(t, bounds)
        if s < 0:
            outside += 1
            continue
        expected[s].append(
            (u, i, *uinfo.get(u, (None,) * 4), *iinfo.get(i, (None, None)), r >= 4, r == 5, r <= 2)
        )
    assert outside >= 1
    _check_store(root, spans, expected, movielens.FIELDS, movielens.TASKS)
    assert fmap.extra["rows_outside_stages"] == outside
    assert "V" in raw.read_vocab(root, "release_year").to_list()  # the quirk is just a token


def test_movielens_checks_the_sha256_and_the_rating(tmp_path):
    path, *_ = _ml_zip(tmp_path, np.random.default_rng(6), n=50)
    c = _ml_config(tmp_path, path)
    c.data.wheel_sha256 = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        movielens.build(c.data, str(tmp_path / "store"), progress=False)
    # A rating of 7 on line 3 of ml-100k.inter.
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = movielens.MEMBER.format("inter")
    lines = members[name].decode().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:2] + ["7", lines[2].split("\t")[3]])
    members[name] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, body in members.items():
            z.writestr(n, body)
    c = _ml_config(tmp_path, path)
    with pytest.raises(raw.RawFormatError) as err:
        movielens.build(c.data, str(tmp_path / "store"), progress=False)
    assert (err.value.line, err.value.column) == (3, "column 3 (rating:float)")
    assert "ml-100k.inter" in str(err.value)
    _assert_clean(tmp_path)


def test_movielens_without_wheel_or_download_says_what_to_run(tmp_path):
    c = load_config("movielens", "tiny")
    c.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps recbole==1.2.1"):
        movielens.build(c.data, str(tmp_path / "store"), progress=False)


def test_movielens_100k_from_the_real_wheel(tmp_path):
    """The pinned wheel itself (downloaded once into ~/.cache/diet_jax/recbole)."""
    c = load_config("movielens", None)
    try:
        movielens.fetch_wheel(c.data)
    except FileNotFoundError as e:
        pytest.skip(f"recbole==1.2.1 could not be downloaded here (no access to PyPI?): {e}")
    fmap = movielens.build(c.data, str(tmp_path / "store"), progress=False)
    assert [s.rows for s in fmap.stages] == [6704, 10304, 23980, 11911, 14095, 10991, 12656, 9359]
    assert fmap.extra["rows_read"] == 100_000 and fmap.extra["rows_outside_stages"] == 0
    store = StageStore(str(tmp_path / "store"))
    y_sum = sum(np.asarray(store.stage(s.name).y_NxK, np.int64).sum(0) for s in fmap.stages)
    assert y_sum.tolist() == [34174 + 21201, 21201, 6110 + 11370]
    assert fmap.num_fields == 8 and fmap.vocab_sizes[2] <= 62  # 61 distinct ages + OOV


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Utf8])
def test_encode_is_the_vocabulary_code_or_oov(dtype):
    """Code i + 1 for the vocabulary's i-th value, OOV for nulls and unseen values."""
    rng = np.random.default_rng(0)
    values = pl.Series("f", rng.integers(0, 500, 2000)).cast(dtype)
    values = values.scatter(np.arange(0, 2000, 97), None)
    vocab = pl.Series("f", np.unique(rng.integers(0, 500, 200))).cast(dtype).sort()
    code = {v: i + 1 for i, v in enumerate(vocab.to_list())}
    want = [code.get(v, raw.OOV) if v is not None else raw.OOV for v in values.to_list()]
    assert raw.encode(values, vocab).tolist() == want
