"""The batch pipeline over a stage: coverage, padding, determinism, order, device placement."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diet_jax.data import loader
from diet_jax.data.store import Stage, StageInfo

ROWS, B = 103, 16  # 6 full batches and a short one of 7 rows


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A memmapped stage whose column 0 is the row number, so batches show which rows they hold."""
    d = tmp_path_factory.mktemp("stage")
    x = np.stack([np.arange(ROWS), np.arange(ROWS) % 7, np.arange(ROWS) % 3], 1).astype(np.int32)
    y = np.stack([np.arange(ROWS) % 2, np.arange(ROWS) % 5 == 0], 1).astype(np.uint8)
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    return Stage(
        StageInfo("s", "historical", ROWS),
        np.load(d / "x.npy", mmap_mode="r"),
        np.load(d / "y.npy", mmap_mode="r"),
    )


def _rows(batches) -> list[np.ndarray]:
    return [np.asarray(b["x"])[np.asarray(b["w"]) > 0, 0] for b in batches]


def test_num_batches():
    assert loader.num_batches(ROWS, B, drop_remainder=True) == 6
    assert loader.num_batches(ROWS, B, drop_remainder=False) == 7
    assert loader.num_batches(96, B, drop_remainder=False) == 6


def test_padded_batch_size_pads_least_and_divides():
    # 10,000 rows: 8,192 -> 16,384 rows of work, 4,096 -> 12,288, 2,048 -> 10,240 (the least).
    assert loader.padded_batch_size(10_000, 8192) == 2048
    # 30,000: 2,048 -> 30,720 is within 1/16 of the least (256 -> 30,208); 4,096 -> 32,768 is not.
    assert loader.padded_batch_size(30_000, 8192) == 2048
    assert loader.padded_batch_size(8192, 8192) == 8192  # no padding: the batch stays
    assert loader.padded_batch_size(100, 1024) == 256  # the floor
    assert loader.padded_batch_size(10_000, 6144, divisor=3) == 1536  # 7 x 1,536 = 10,752
    assert loader.padded_batch_size(10_000, 8192, divisor=8192) == 8192  # cannot split further
    assert loader.padded_batch_size(100, 100) == 100  # odd or small: unchanged


def test_epoch_with_padding_covers_every_row_once(stage):
    ds = loader.batch_dataset(stage, B, shuffle=True, seed=3, epoch=1, drop_remainder=False)
    batches = [ds[i] for i in range(len(ds))]
    assert len(batches) == 7
    for b in batches:  # one static shape, so a jitted step compiles once
        assert b["x"].shape == (B, 3) and b["y"].shape == (B, 2) and b["w"].shape == (B,)
        assert b["x"].dtype == np.int32 and b["y"].dtype == np.uint8 and b["w"].dtype == np.float32
    np.testing.assert_array_equal(np.sort(np.concatenate(_rows(batches))), np.arange(ROWS))
    last = batches[-1]
    np.testing.assert_array_equal(last["w"], np.r_[np.ones(7), np.zeros(9)])
    np.testing.assert_array_equal(last["x"][7:], 0)
    # Every row's x and y travel together.
    for b in batches:
        r = np.asarray(b["x"])[:, 0][b["w"] > 0]
        np.testing.assert_array_equal(b["x"][b["w"] > 0], np.asarray(stage.x_NxF)[r])
        np.testing.assert_array_equal(b["y"][b["w"] > 0], np.asarray(stage.y_NxK)[r])


def test_drop_remainder_and_shuffle_determinism(stage):
    def epoch_rows(seed, epoch):
        ds = loader.batch_dataset(stage, B, shuffle=True, seed=seed, epoch=epoch)
        return np.concatenate(_rows(ds[i] for i in range(len(ds))))

    rows = epoch_rows(0, 1)
    assert rows.size == 96 and np.unique(rows).size == 96  # 6 full batches, no repeats
    np.testing.assert_array_equal(rows, epoch_rows(0, 1))  # same (seed, epoch), same batches
    assert not np.array_equal(rows, epoch_rows(0, 2))  # a new permutation per epoch
    assert not np.array_equal(rows, epoch_rows(1, 1))
    ordered = loader.batch_dataset(stage, B, shuffle=False)
    np.testing.assert_array_equal(
        np.concatenate(_rows(ordered[i] for i in range(6))), np.arange(96)
    )


def test_batch_size_must_be_positive(stage):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        loader.batch_dataset(stage, 0, shuffle=False)


@pytest.mark.parametrize("prefetch", [1, 4, 20])
def test_device_batches_in_order_and_on_device(stage, prefetch):
    kw = dict(shuffle=True, seed=5, epoch=2, drop_remainder=False)
    ds = loader.batch_dataset(stage, B, **kw)
    got = list(loader.device_batches(stage, B, prefetch=prefetch, **kw))
    assert len(got) == len(ds)
    for i, b in enumerate(got):
        assert all(isinstance(v, jax.Array) for v in b.values())
        for k in ("x", "y", "w"):
            np.testing.assert_array_equal(np.asarray(b[k]), ds[i][k])


def test_device_batches_sharded(stage):
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    sharding = NamedSharding(mesh, P("data"))
    got = list(loader.device_batches(stage, B, shuffle=False, sharding=sharding))
    assert len(got) == 6
    assert got[0]["x"].sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_array_equal(np.asarray(got[1]["x"])[:, 0], np.arange(B, 2 * B))


def test_prefetch_to_device_keeps_order():
    items = [{"a": np.full(2, i)} for i in range(5)]
    for size in (1, 2, 8):
        out = list(loader.prefetch_to_device(iter(items), size=size))
        assert [int(o["a"][0]) for o in out] == list(range(5))
        assert isinstance(out[0]["a"], jax.Array)
