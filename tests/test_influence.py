"""The influence toolkit against brute force, in float64 on small models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from diet_jax import influence
from diet_jax.data.store import FeatureMap
from diet_jax.models import build_model

B_REAL, B_SYN = 5, 4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def brute_grads(loss_fn, params, batch) -> np.ndarray:
    """[B, P] by a Python loop over samples: the slowest, most obviously right reference."""
    b = jax.tree.leaves(batch)[0].shape[0]
    grad_one = jax.jit(jax.grad(lambda p, one: loss_fn(p, one)[0]))
    rows = []
    for i in range(b):
        rows.append(flat(grad_one(params, jax.tree.map(lambda a, i=i: a[i : i + 1], batch))))
    return np.stack(rows)


@pytest.fixture(scope="module")
def problem():
    """Tiny DCN + MMoE in float64: dense params, a real batch (0/1 labels) and a synthetic batch
    (soft labels), their losses, and a random direction."""
    with jax.enable_x64(True):
        cfg = load_config("synthetic", "tiny")
        fmap = FeatureMap("t", ("a", "b", "c"), (7, 5, 3), ("t1", "t2", "t3"), ())
        model = build_model(cfg.model, fmap)
        params, state = model.init(jax.random.key(0))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        ks = jax.random.split(jax.random.key(1), 5)
        x = jax.random.randint(ks[0], (B_REAL, 3), 0, 3)
        # The trained table is far from the N(0, 1e-4) init: scale it so gradients are O(1).
        e_real = model.embed(params["embed"], x) * 1e3
        real = {"e": e_real, "y": jax.random.bernoulli(ks[1], 0.4, (B_REAL, 3)).astype(jnp.float64)}
        syn = {
            "e": jax.random.normal(ks[2], (B_SYN, 3, cfg.model.embed_dim), jnp.float64),
            "y": jax.nn.sigmoid(jax.random.normal(ks[3], (B_SYN, 3), jnp.float64)),
        }
        direction = jax.tree.map(
            lambda p: jax.random.normal(ks[4], p.shape, jnp.float64), params["dense"]
        )
        loss_fn = influence.dense_loss(model, state)
        yield {"loss": loss_fn, "w": params["dense"], "real": real, "syn": syn, "v": direction}


def test_el2n_by_hand():
    logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), -jnp.log(3.0)]])
    y = jnp.array([[1, 0], [1, 1]])
    # row 0: |0.5-1|, |0.5-0| -> sqrt(0.5); row 1: |0.75-1|, |0.25-1| -> sqrt(0.0625+0.5625)
    np.testing.assert_allclose(influence.el2n(logits, y), [np.sqrt(0.5), np.sqrt(0.625)], 1e-6)


def test_per_sample_grads_and_grad_dot_match_brute_force(problem):
    with jax.enable_x64(True):
        loss, w, real, v = problem["loss"], problem["w"], problem["real"], problem["v"]
        brute = brute_grads(loss, w, real)
        psg = influence.per_sample_grads(loss, w, real)
        vmap_rows = np.concatenate(
            [np.asarray(x).reshape(B_REAL, -1) for x in jax.tree.leaves(psg)], axis=1
        )
        assert rel_err(vmap_rows, brute) < 1e-6
        expected = brute @ flat(v)
        assert (
            rel_err(jax.jit(influence.grad_dot, static_argnums=0)(loss, w, real, v), expected)
            < 1e-6
        )
        # Chunked (padded with repeats of the last row) gives the same values.
        chunked = influence.grad_dot(loss, w, real, v, chunk_size=2)
        assert chunked.shape == (B_REAL,)
        assert rel_err(chunked, expected) < 1e-6
        weights = jnp.array([1.0, 0.0, 2.0, 1.0, 0.5], jnp.float64)
        gsum = influence.grad_sum(loss, w, real, weights, chunk_size=2)
        assert rel_err(flat(gsum), np.asarray(weights) @ brute) < 1e-6


def test_pairwise_vmap_and_ghost_match_brute_force(problem):
    with jax.enable_x64(True):
        loss, w, real, syn = problem["loss"], problem["w"], problem["real"], problem["syn"]
        brute = brute_grads(loss, w, syn) @ brute_grads(loss, w, real).T
        assert np.abs(brute).max() > 1e-3  # not trivially zero
        a_vmap = influence.pairwise(loss, loss, w, syn, real, method="vmap")
        a_ghost = influence.pairwise(loss, loss, w, syn, real, method="ghost")
        assert a_vmap.shape == a_ghost.shape == (B_SYN, B_REAL)
        assert rel_err(a_vmap, brute) < 1e-6
        assert rel_err(a_ghost, brute) < 1e-6
        with pytest.raises(ValueError, match="Unsupported pairwise"):
            influence.pairwise(loss, loss, w, syn, real, method="nope")


def test_deficiency_and_responsibility_equal_double_sums(problem):
    with jax.enable_x64(True):
        loss, w, real, syn = problem["loss"], problem["w"], problem["real"], problem["syn"]
        a_SxR = brute_grads(loss, w, syn) @ brute_grads(loss, w, real).T  # A(x, z)
        d = influence.deficiency(loss, loss, w, real, syn)
        np.testing.assert_allclose(
            d, [sum(a_SxR[i, j] for i in range(B_SYN)) for j in range(B_REAL)], rtol=1e-6
        )
        hard = jnp.array([4, 1])
        batch_hard = jax.tree.map(lambda a: a[hard], real)
        r = influence.responsibility(loss, loss, w, syn, batch_hard)
        np.testing.assert_allclose(r, [a_SxR[i, 4] + a_SxR[i, 1] for i in range(B_SYN)], rtol=1e-6)
        # Weights are a mask over the targets: the same sums.
        mask = jnp.array([0.0, 1.0, 0.0, 0.0, 1.0], jnp.float64)
        np.testing.assert_allclose(
            influence.responsibility(loss, loss, w, syn, real, mask), r, rtol=1e-9
        )


class TokenNet(nn.Module):
    """One Dense shared over tokens and applied twice, a bias outside Dense, BatchNorm in eval."""

    @nn.compact
    def __call__(self, x_BxTxD):
        shared = nn.Dense(4, name="shared")
        h = nn.tanh(shared(x_BxTxD))
        h = nn.tanh(shared(h) + self.param("b", nn.initializers.normal(1.0), (4,)))
        h = nn.BatchNorm(use_running_average=True)(h)
        return nn.Dense(2, use_bias=False, name="out")(h.reshape(h.shape[0], -1))


def test_ghost_with_token_axes_shared_layers_and_non_dense_params():
    with jax.enable_x64(True):
        net = TokenNet()
        x = jax.random.normal(jax.random.key(0), (6, 3, 4), jnp.float64)
        variables = net.init(jax.random.key(1), x)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
        stats = {"batch_stats": variables["batch_stats"]}
        y = jax.random.bernoulli(jax.random.key(2), 0.5, (6, 2)).astype(jnp.float64)

        def loss(p, b):
            logits = net.apply({"params": p, **stats}, b["x"])
            return jnp.sum(jnp.logaddexp(0.0, logits) - b["y"] * logits, axis=-1)

        batch = {"x": x, "y": y}
        g = brute_grads(loss, variables["params"], batch)
        a_ghost = influence.pairwise_ghost(loss, loss, variables["params"], batch, batch)
        assert rel_err(a_ghost, g @ g.T) < 1e-6


def test_ghost_rejects_params_not_at_the_root(problem):
    loss, w, real = problem["loss"], problem["w"], problem["real"]
    wrapped = {"inner": w}
    with pytest.raises(ValueError, match="not found in params"):
        influence.pairwise_ghost(
            lambda p, b: loss(p["inner"], b), lambda p, b: loss(p["inner"], b), wrapped, real, real
        )


def test_linearized_losses_equal_grad_dot_and_grad_sum(problem):
    with jax.enable_x64(True):
        loss, w, syn, v = problem["loss"], problem["w"], problem["syn"], problem["v"]
        losses, dots, grad_of_sum = influence.linearize_losses(loss, w, syn)
        np.testing.assert_allclose(losses, loss(w, syn), rtol=1e-12)
        g = brute_grads(loss, w, syn)
        assert rel_err(dots(v), g @ flat(v)) < 1e-9
        assert rel_err(dots(v), influence.grad_dot(loss, w, syn, v)) < 1e-9
        weights = jnp.array([1.0, 0.0, 2.0, 0.5], jnp.float64)
        assert rel_err(flat(grad_of_sum(weights)), np.asarray(weights) @ g) < 1e-9
        assert rel_err(flat(grad_of_sum()), g.sum(0)) < 1e-9


def test_address_shared_pass_equals_separate_directions(problem):
    """address() shares the memory's forward pass; hard_targets + active_memory do not."""
    from diet_jax.distill import addressing

    with jax.enable_x64(True):
        loss, w, real, syn = problem["loss"], problem["w"], problem["real"], problem["syn"]
        real_w = {**real, "w": jnp.array([1.0, 1.0, 0.0, 1.0, 1.0], jnp.float64)}
        valid = jnp.array([True, True, False, True])
        kw = dict(hard_size=2, active_size=2, key=jax.random.key(0), syn_valid_N=valid)
        hard, active, stats = addressing.address(loss, w, real_w, syn, **kw)
        # chunk_size < N: the separate path (hard_targets, then active_memory).
        hard_c, active_c, stats_c = addressing.address(loss, w, real_w, syn, chunk_size=3, **kw)
        want_hard, deficiency = addressing.hard_targets(loss, w, real, syn, 2, real_w["w"], valid)
        batch_hard = jax.tree.map(lambda a: a[want_hard], real)
        want_active, resp = addressing.active_memory(loss, w, syn, batch_hard, 2, valid)
        for got in (hard, hard_c):
            np.testing.assert_array_equal(np.sort(got), np.sort(want_hard))
        for got in (active, active_c):
            np.testing.assert_array_equal(np.sort(got), np.sort(want_active))
        assert 2 not in np.asarray(hard) and 2 not in np.asarray(active)
        for s in (stats, stats_c):
            np.testing.assert_allclose(s["deficiency_mean"], jnp.mean(deficiency), rtol=1e-9)
            np.testing.assert_allclose(
                s["responsibility_mean"], jnp.sum(resp * valid) / 3, rtol=1e-9
            )
        # The double sums by brute force: the shared pass computes eq. 16 and 17 exactly.
        a_SxR = brute_grads(loss, w, syn) @ brute_grads(loss, w, real).T
        np.testing.assert_allclose(deficiency, (a_SxR * np.asarray(valid)[:, None]).sum(0), 1e-6)
        np.testing.assert_allclose(resp, a_SxR[:, np.asarray(want_hard)].sum(1), rtol=1e-6)
