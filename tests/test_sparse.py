"""Row-sparse embedding updates against dense gradients, optax.adam and hand computations."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from diet_jax.models import build_model
from diet_jax.train import optim, sparse, steps

VOCAB = (6, 4, 5)  # V = 15 table rows; tiny so that a batch can touch every row
FMAP = types.SimpleNamespace(vocab_sizes=VOCAB, num_tasks=3)
V = sum(VOCAB)


def _train_cfg(opt: str, max_grad_norm: float = 10.0):
    cfg = load_config("synthetic", "tiny").train
    cfg.embedding_optimizer = opt
    cfg.max_grad_norm = max_grad_norm
    return cfg


@pytest.fixture(scope="module")
def model():
    return build_model(load_config("synthetic", "tiny").model, FMAP)


def _init(model, seed=0):
    params, model_state = model.init(jax.random.key(seed))
    # A larger table than the 1e-4 init, so gradients w.r.t. the dense part are not trivial.
    table = jax.random.normal(jax.random.key(seed + 1), params["embed"]["table"].shape)
    return {**params, "embed": {"table": table}}, model_state


def _batch(x_BxF, seed=0):
    rng = np.random.default_rng(seed)
    b = x_BxF.shape[0]
    return {
        "x": jnp.asarray(x_BxF, jnp.int32),
        "y": jnp.asarray(rng.random((b, 3)) < 0.4, jnp.uint8),
        "w": jnp.asarray(np.r_[np.ones(b - 1), 0.0], jnp.float32),  # one padded row, weight 0
    }


def _partial_batch(seed=0):
    """Repeated ids, and rows 0, 5 (field 0) and 3 (field 1) never read."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(1, 5, 12), rng.integers(0, 3, 12), rng.integers(0, 5, 12)], 1)
    return _batch(x, seed)


def _full_batch(seed=0):
    """Every row of every field read (several times) in one batch."""
    x = np.stack([np.arange(12) % v for v in VOCAB], 1)
    return _batch(np.random.default_rng(seed).permutation(x), seed)


@functools.partial(jax.jit, static_argnums=0)
def _dense_grads(model, params, model_state, batch):
    def loss_fn(p):
        logits, _, aux = model.apply(p, model_state, batch["x"], train=True)
        return steps.weighted_mean(steps.bce_per_sample(logits, batch["y"]), batch["w"]) + aux

    return jax.grad(loss_fn)(params)


_sparse_grads = jax.jit(steps.sparse_grads, static_argnums=0)


def test_unique_rows_and_repeated_ids_summed():
    rows_N = jnp.array([3, 1, 3, 3, 0, 1], jnp.int32)
    rows_U, inverse_N = sparse.unique_rows(rows_N, num_rows=5)
    np.testing.assert_array_equal(rows_U, [0, 1, 3, 8, 9, 10])  # padded: V + position
    np.testing.assert_array_equal(rows_U[inverse_N], rows_N)
    g_NxD = jnp.arange(12.0).reshape(6, 2)
    g_UxD = sparse.segment_row_grads(g_NxD, inverse_N)
    expected = np.zeros((5, 2))
    np.add.at(expected, np.asarray(rows_N), np.asarray(g_NxD))  # brute force
    np.testing.assert_allclose(sparse.sparse_table_grad(5, rows_U, g_UxD), expected)
    np.testing.assert_allclose(g_UxD[:3], [[8.0, 9.0], [12.0, 14.0], [10.0, 13.0]])
    np.testing.assert_allclose(g_UxD[3:], 0.0)  # padding rows get nothing


def test_sparse_grad_equals_dense_grad(model):
    params, model_state = _init(model)
    batch = _partial_batch()
    loss, _, g_dense, rows_U, g_UxD = _sparse_grads(model, params, model_state, batch)
    ref = _dense_grads(model, params, model_state, batch)
    g_table = np.asarray(sparse.sparse_table_grad(V, rows_U, g_UxD))
    ref_table = np.asarray(ref["embed"]["table"])
    touched = np.zeros(V, bool)
    touched[np.asarray(batch["x"] + np.array([0, 6, 10])).ravel()] = True
    assert 0 < touched.sum() < V
    np.testing.assert_allclose(g_table[touched], ref_table[touched], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_table[~touched], 0.0)
    np.testing.assert_array_equal(ref_table[~touched], 0.0)
    assert np.abs(g_table[touched]).max() > 1e-4  # not trivially zero
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_dense, ref["dense"]
    )
    # Only the unique rows carry values: at most B*F of them, the rest is padding.
    assert int(jnp.sum(rows_U < V)) == int(touched.sum())


@pytest.mark.parametrize("max_grad_norm", [10.0, 0.05])  # 0.05: the joint clipping is active
def test_lazy_adam_equals_dense_adam_when_every_row_is_touched(model, max_grad_norm):
    params, model_state = _init(model)
    dense = steps.make_trainer(model, _train_cfg("dense_adam", max_grad_norm))
    lazy = steps.make_trainer(model, _train_cfg("lazy_adam", max_grad_norm))
    s_dense = dense.init(*jax.tree.map(jnp.copy, (params, model_state)))
    s_lazy = lazy.init(*jax.tree.map(jnp.copy, (params, model_state)))
    for i in range(3):
        s_dense, m_dense = dense.step(s_dense, _full_batch(i))
        s_lazy, m_lazy = lazy.step(s_lazy, _full_batch(i))
        np.testing.assert_allclose(m_lazy["loss"], m_dense["loss"], rtol=1e-5)
    moved = np.abs(
        np.asarray(s_dense.params["embed"]["table"]) - np.asarray(params["embed"]["table"])
    )
    assert moved.min() > 0  # every row was updated
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        s_lazy.params,
        s_dense.params,
    )
    adam_dense = s_dense.opt_state[-1][0]  # chain(clip, adam) -> ScaleByAdamState
    np.testing.assert_allclose(
        s_lazy.opt_state["embed"].mu, adam_dense.mu["embed"]["table"], rtol=1e-4, atol=1e-9
    )
    np.testing.assert_allclose(
        s_lazy.opt_state["embed"].nu, adam_dense.nu["embed"]["table"], rtol=1e-4, atol=1e-12
    )


def test_lazy_adam_leaves_untouched_rows_alone(model):
    params, model_state = _init(model)
    lazy = steps.make_trainer(model, _train_cfg("lazy_adam"))
    state = lazy.init(*jax.tree.map(jnp.copy, (params, model_state)))
    state, _ = lazy.step(state, _full_batch(0))  # every row gets moments
    table_before = np.asarray(state.params["embed"]["table"])
    mu_before = np.asarray(state.opt_state["embed"].mu)
    batch = _partial_batch(1)
    state, _ = lazy.step(state, batch)
    touched = np.zeros(V, bool)
    touched[np.asarray(batch["x"] + np.array([0, 6, 10])).ravel()] = True
    table = np.asarray(state.params["embed"]["table"])
    np.testing.assert_array_equal(table[~touched], table_before[~touched])
    np.testing.assert_array_equal(
        np.asarray(state.opt_state["embed"].mu)[~touched], mu_before[~touched]
    )
    assert np.all(np.abs(table[touched] - table_before[touched]).max(axis=1) > 0)


def test_rowwise_adagrad_matches_hand_computation():
    lr, eps = 0.1, 1e-8
    opt = sparse.rowwise_adagrad(lr, eps=eps)
    table = jnp.arange(12.0).reshape(4, 3)
    state = opt.init(table)
    rows_U = jnp.array([2, 0, 4, 5])  # 4, 5: padding (V = 4)
    g1 = jnp.array([[1.0, 2.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g2 = jnp.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    table1, state = jax.jit(opt.update)(table, state, rows_U, g1)
    table2, state = jax.jit(opt.update)(table1, state, jnp.array([2, 4, 5, 6]), g2)
    w, acc = np.arange(12.0).reshape(4, 3), np.zeros(4)
    for rows, g in (([2, 0], np.asarray(g1[:2])), ([2], np.asarray(g2[:1]))):
        for r, gr in zip(rows, g, strict=True):
            acc[r] += np.mean(gr**2)
            w[r] -= lr * gr / (np.sqrt(acc[r]) + eps)
    np.testing.assert_allclose(table2, w, rtol=1e-6)
    np.testing.assert_allclose(state.acc, acc, rtol=1e-6)
    np.testing.assert_allclose(acc, [3.0, 0.0, 3.0 + 3.0, 0.0])  # rows 1, 3 never touched


@pytest.mark.parametrize("opt", sparse.EMBEDDING_OPTIMIZERS)
def test_donation_updates_the_table_in_place(model, opt):
    params, model_state = _init(model)
    trainer = steps.make_trainer(model, _train_cfg(opt))
    state = trainer.init(params, model_state)
    state, _ = trainer.step(state, _partial_batch(0))
    table = state.params["embed"]["table"]
    pointer = table.unsafe_buffer_pointer()
    new, _ = trainer.step(state, _partial_batch(1))
    jax.block_until_ready(new)
    assert table.is_deleted()  # the donated input is gone ...
    assert new.params["embed"]["table"].unsafe_buffer_pointer() == pointer  # ... reused, not copied
    if opt != "dense_adam":
        for leaf in jax.tree.leaves(state.opt_state["embed"]):
            assert leaf.is_deleted()


def test_sparse_step_with_row_sharded_table():
    """A table row-sharded over 4 devices gives the same step as a single-device table."""
    m16 = build_model(
        load_config("synthetic", "tiny").model,
        types.SimpleNamespace(vocab_sizes=(8, 4, 4), num_tasks=3),  # 16 rows, 4 per device
    )
    params, model_state = m16.init(jax.random.key(0))
    trainer = steps.make_trainer(m16, _train_cfg("lazy_adam"))
    batch = _partial_batch(2)
    ref, _ = trainer.step(trainer.init(*jax.tree.map(jnp.copy, (params, model_state))), batch)
    # Auto axes: GSPMD propagates the sharding through the gathers and scatters.
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    rows = NamedSharding(mesh, P("data"))
    table = jax.device_put(params["embed"]["table"], rows)
    state = trainer.init({**params, "embed": {"table": table}}, model_state)
    state, _ = trainer.step(state, batch)
    new_table = state.params["embed"]["table"]
    assert table.is_deleted()
    assert new_table.sharding.is_equivalent_to(rows, 2)  # still row-sharded, not gathered
    np.testing.assert_allclose(new_table, ref.params["embed"]["table"], rtol=1e-5, atol=1e-7)


def test_unknown_embedding_optimizer_raises(model):
    with pytest.raises(ValueError, match="Unsupported embedding_optimizer"):
        steps.make_trainer(model, _train_cfg("adamw"))


def test_make_optimizer_clip_flag():
    cfg = _train_cfg("lazy_adam", max_grad_norm=1.0)
    cfg.optimizer, cfg.learning_rate = "sgd", 1.0
    g = {"a": jnp.array([3.0, 4.0])}  # norm 5
    for clip, expected in ((True, [-0.6, -0.8]), (False, [-3.0, -4.0])):
        tx = steps.make_optimizer(cfg, clip=clip)
        np.testing.assert_allclose(tx.update(g, tx.init(g))[0]["a"], expected, rtol=1e-6)


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "dense_adam"])
def test_runtime_learning_rate_trains_like_the_constant_one(model, opt):
    """A runtime_lr trainer built at another rate, set to 3e-3 in its state, takes the very
    steps of the trainer whose rate 3e-3 is a constant (bitwise); one compiled step serves both
    rates; a state without a runtime rate is refused."""
    cfg = _train_cfg(opt)
    cfg.learning_rate = 3e-3
    other = _train_cfg(opt)
    other.learning_rate = 0.5
    const = steps.make_trainer(model, cfg)
    runtime = steps.make_trainer(model, other, runtime_lr=True)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 (the steps donate their state)
    params, model_state = _init(model)
    a = const.init(copy(params), copy(model_state))
    b = runtime.init(copy(params), copy(model_state))
    b = b.replace(opt_state=optim.set_learning_rate(b.opt_state, 3e-3))
    for seed in range(3):
        batch = _partial_batch(seed)
        a, _ = const.step(a, batch)
        b, _ = runtime.step(b, batch)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The rate really acts: at 0.5 the same steps land elsewhere.
    c = runtime.init(copy(params), copy(model_state))
    for seed in range(3):
        c, _ = runtime.step(c, _partial_batch(seed))
    assert not all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(
            jax.tree.leaves(a.params["dense"]), jax.tree.leaves(c.params["dense"]), strict=True
        )
    )
    assert runtime.step._cache_size() == 1
    with pytest.raises(ValueError, match="no runtime learning rate"):
        optim.set_learning_rate(a.opt_state, 1e-3)


def test_reference_training_with_rowwise_adagrad(tiny_store, tmp_path):
    """The teacher picks the sparse path from the config, learns, and round-trips checkpoints."""
    from diet_jax.train import loop
    from diet_jax.train.reference import train_reference

    cfg = load_config("synthetic", "tiny")
    cfg.train.embedding_optimizer = "rowwise_adagrad"
    run = train_reference(cfg, tiny_store, str(tmp_path))
    assert isinstance(run.final.opt_state["embed"], sparse.RowwiseAdagradState)
    m = loop.evaluate(
        steps.make_predict_step(run.model),
        run.final.params,
        run.final.model_state,
        tiny_store.stages("test")[0],
        cfg.train.eval_batch_size,
        tiny_store.feature_map.tasks,
    )
    assert m["auc"] > 0.6, m
    # The pass's batch is shrunk to pad least (3,000 rows at 4,096 -> 1,024 x 3); the logits
    # are those of one forward pass over every row.
    test = tiny_store.stages("test")[0]
    predict_step = steps.make_predict_step(run.model)
    logits = loop.predict(predict_step, run.final.params, run.final.model_state, test, 4096)
    whole = predict_step(run.final.params, run.final.model_state, jnp.asarray(test.x_NxF))
    np.testing.assert_allclose(logits, np.asarray(whole), rtol=1e-5, atol=1e-5)
    acc_1 = np.asarray(run.stage_state(1).opt_state["embed"].acc)  # phi_1 from its checkpoint
    acc_T = np.asarray(run.final.opt_state["embed"].acc)
    assert np.all(acc_T >= acc_1) and np.any(acc_T > acc_1)  # accumulators only grow
    rerun = train_reference(cfg, tiny_store, str(tmp_path))  # everything restored
    assert rerun.restored == run.stage_names
    np.testing.assert_array_equal(rerun.final.opt_state["embed"].acc, acc_T)
