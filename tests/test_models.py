"""The model zoo: DCN, DCNv2, FinalNet, FinalMLP and WuKong, each behind the shared MMoE head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from diet_jax.data.store import FeatureMap
from diet_jax.models import BACKBONES, build_backbone, build_model
from diet_jax.models.dcnv2 import CrossNetMix
from diet_jax.models.finalmlp import InteractionAggregation
from diet_jax.models.wukong import FactorizationMachineBlock
from diet_jax.train.loop import evaluate, train_epoch
from diet_jax.train.optim import make_optimizer
from diet_jax.train.steps import (
    bce_per_sample,
    create_train_state,
    make_predict_step,
    make_train_step,
)

MODELS = ("dcn", "dcnv2", "finalnet", "finalmlp", "wukong")
# Switches that turn BatchNorm on in models whose default has none.
BN_ON = {
    "dcn": {"use_bn": True},
    "dcnv2": {"use_bn": True},
    "finalnet": {},
    "finalmlp": {"use_bn": True},
    "wukong": {},
}


def test_backbones_listed():
    assert BACKBONES == MODELS


def fmap_of(config) -> FeatureMap:
    d = config.data
    return FeatureMap("synthetic", tuple(d.field_names), tuple(d.vocab_sizes), tuple(d.tasks), ())


def model_of(name, arg="tiny", **overrides):
    config = load_config("synthetic", arg)
    for k, v in overrides.items():
        config.model[name][k] = v
    return config, build_model(config.model, fmap_of(config), name)


def ids(config, b, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(
        np.stack([rng.integers(0, v, b) for v in config.data.vocab_sizes], 1), jnp.int32
    )


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- parameter formulas
def mlp_n(d_in, hidden, bn=False, out=None):
    """Dense layers (kernel + bias), 2 BatchNorm parameters per unit, optional output layer."""
    n = 0
    for h in hidden:
        n += d_in * h + h + (2 * h if bn else 0)
        d_in = h
    return n + (d_in * out + out if out else 0)


def head_n(m, h_in, k):
    e, u = m.num_experts, m.expert_hidden[-1]
    return (
        e * mlp_n(h_in, m.expert_hidden)
        + k * mlp_n(h_in, m.gate_hidden, out=e)
        + k * mlp_n(u, m.tower_hidden, out=1)
    )


def backbone_n(name, m, f, d):
    """(backbone parameters, width of the representation the head reads)."""
    x = f * d
    if name == "dcn":
        c = m.dcn
        return c.num_cross_layers * 2 * x + mlp_n(x, c.hidden, c.use_bn), x + c.hidden[-1]
    if name == "dcnv2":
        c, L = m.dcnv2, m.dcnv2.num_cross_layers
        if c.low_rank_mixture:
            e, r = c.num_experts, c.low_rank
            n = x * e + L * (2 * e * x * r + e * r * r + x)
        else:
            n = L * (x * x + x)
        # Both MLPs read a width-x input: the stacked one cross(x0), the parallel one x0.
        stk, par = mlp_n(x, c.stacked_hidden, c.use_bn), mlp_n(x, c.parallel_hidden, c.use_bn)
        return {
            "parallel": (n + par, x + c.parallel_hidden[-1]),
            "stacked": (n + stk, c.stacked_hidden[-1]),
            "stacked_parallel": (n + stk + par, c.stacked_hidden[-1] + c.parallel_hidden[-1]),
            "crossnet_only": (n, x),
        }[c.structure]
    if name == "finalnet":
        c = m.finalnet
        mult = 1 if c.residual_type == "concat" else 2

        def block(d_in, hidden):
            n = 0
            for h in hidden:
                n += d_in * mult * h + mult * h + (2 * h if c.use_bn else 0)
                d_in = h
            return n

        n = (f * f + f if c.feature_gating else 0) + block(
            2 * x if c.feature_gating else x, c.block1_hidden
        )
        if c.block_type == "2B":
            n += block(x, c.block2_hidden)
        return n, c.block1_hidden[-1]
    if name == "finalmlp":
        c = m.finalmlp
        n = mlp_n(x, c.mlp1_hidden, c.use_bn) + mlp_n(x, c.mlp2_hidden, c.use_bn)
        if c.use_fs:
            for ctx in (c.fs1_context, c.fs2_context):
                n += (0 if ctx else d) + mlp_n(len(ctx) * d if ctx else d, c.fs_hidden, out=x)
        dx, dy, o = c.mlp1_hidden[-1], c.mlp2_hidden[-1], c.fusion_dim
        return n + (dx + dy + 2) * o + dx * dy * o // c.num_heads, o
    if name == "wukong":
        c = m.wukong
        n_out, n_in, n = c.lcb_features + c.fmb_features, f, 0
        for _ in range(c.num_layers):
            fm = n_in * c.rank_k if c.rank_k else n_in * n_in
            n += (n_in * c.rank_k) + 2 * fm + mlp_n(fm, c.fmb_hidden, out=c.fmb_features * d)
            n += n_in * c.lcb_features + (n_in * n_out + n_out if n_in != n_out else 0)
            n += 2 * d if c.layer_norm else 0
            n_in = n_out
        return n + mlp_n(n_out * d, c.top_hidden, c.top_bn), c.top_hidden[-1]
    raise AssertionError(name)


VARIANTS = (
    [(name, "tiny", {}) for name in MODELS]
    + [
        (name, None, {})
        for name in MODELS  # the default (full-size) configuration
    ]
    + [
        ("dcnv2", "tiny", {"structure": "stacked", "low_rank_mixture": True}),
        ("dcnv2", "tiny", {"structure": "stacked_parallel", "use_bn": True}),
        ("dcnv2", "tiny", {"structure": "crossnet_only", "low_rank_mixture": True}),
        ("finalnet", "tiny", {"block_type": "1B", "residual_type": "sum", "feature_gating": False}),
        ("finalnet", "tiny", {"residual_type": "sum", "use_bn": False}),
        ("finalmlp", "tiny", {"fs1_context": (0, 2), "fs2_context": (5,), "use_bn": True}),
        ("finalmlp", "tiny", {"use_fs": False, "num_heads": 1}),
        ("wukong", "tiny", {"rank_k": 0, "layer_norm": False, "top_bn": False}),
        ("wukong", "tiny", {"num_layers": 1, "lcb_features": 5, "fmb_features": 3}),  # n_out == F
    ]
)


@pytest.mark.parametrize("name,arg,overrides", VARIANTS)
def test_parameter_count_matches_formula(name, arg, overrides):
    config, model = model_of(name, arg, **overrides)
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    f, d, k = len(config.data.vocab_sizes), config.model.embed_dim, len(config.data.tasks)
    n_backbone, h = backbone_n(name, config.model, f, d)
    assert count(params["embed"]) == sum(config.data.vocab_sizes) * d
    assert count(params["dense"]) == n_backbone + head_n(config.model.mmoe, h, k)
    # Running statistics: a mean and a variance per unit, as many as BN's scale and bias.
    assert set(state) <= {"batch_stats"}
    n_bn = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params["dense"])
        if any(str(getattr(k, "key", "")).startswith("bn_") for k in path)
    )
    assert count(state) == n_bn


# ----------------------------------------------------------------------------- forward and BN
@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_finite(name):
    config, model = model_of(name)
    params, state = model.init(jax.random.key(0))
    x = ids(config, 16)
    e = model.embed(params["embed"], x)
    assert e.shape == (16, len(config.data.vocab_sizes), config.model.embed_dim)
    for train in (False, True):
        logits, new_state, aux = model.dense(params["dense"], state, e, train=train)
        assert logits.shape == (16, len(config.data.tasks))
        assert aux.shape == ()
        assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.isfinite(aux))
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # Only FinalNet 2B carries an auxiliary (self-distillation) loss.
    assert (float(aux) > 0) == (name == "finalnet")


@pytest.mark.parametrize("name", MODELS)
def test_batchnorm_train_and_eval(name):
    config, model = model_of(name, **BN_ON[name])
    params, state = model.init(jax.random.key(1))
    assert "batch_stats" in state
    e = model.embed(params["embed"], ids(config, 32, seed=1))
    e = e + jax.random.normal(jax.random.key(2), e.shape)  # move activations off the init scale

    _, same, _ = model.dense(params["dense"], state, e, train=False)
    assert same is state  # eval mode never touches the running statistics

    _, trained, _ = model.dense(params["dense"], state, e, train=True)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, trained)
    assert all(jax.tree.leaves(changed)), "every BatchNorm layer updates its statistics"

    # Eval mode: a row's logits do not depend on the other rows of its batch.
    alone, _, _ = model.dense(params["dense"], trained, e[:4], train=False)
    mixed, _, _ = model.dense(params["dense"], trained, jnp.concatenate([e[:4], 5 * e[4:]]))
    np.testing.assert_allclose(alone, mixed[:4], rtol=1e-5, atol=1e-5)
    # Train mode normalises with the batch's statistics, so the same rows do change.
    t_alone, _, _ = model.dense(params["dense"], state, e[:4], train=True)
    t_mixed, _, _ = model.dense(params["dense"], state, jnp.concatenate([e[:4], 5 * e[4:]]), True)
    assert not np.allclose(t_alone, t_mixed[:4], atol=1e-4)


# ----------------------------------------------------------------------------- formulas, brute force
def test_finalnet_two_blocks_share_the_head_and_self_distill():
    config, model = model_of("finalnet")
    params, state = model.init(jax.random.key(3))
    e = model.embed(params["embed"], ids(config, 8)) + jax.random.normal(
        jax.random.key(4), (8, 8, config.model.embed_dim)
    )

    def per_block(mdl, e):
        h1, h2 = mdl.backbone(e, True)
        return mdl.head(h1, True), mdl.head(h2, True)

    (l1, l2), _ = model.dense_net.apply(
        {"params": params["dense"], **state}, e, method=per_block, mutable=["batch_stats"]
    )
    logits, _, aux = model.dense(params["dense"], state, e, train=True)
    np.testing.assert_allclose(logits, 0.5 * (l1 + l2), rtol=1e-5, atol=1e-6)
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))

    def bce(z, t):
        z = np.asarray(z, np.float64)
        return np.mean(np.sum(np.logaddexp(0, z) - t * z, axis=-1))

    np.testing.assert_allclose(float(aux), bce(l1, p) + bce(l2, p), rtol=1e-5)

    # The target is held fixed: the aux gradient equals that of the loss with sg(target).
    def aux_of(pd):
        return model.dense(pd, state, e, train=True)[2]

    def aux_fixed(pd):
        (a, b), _ = model.dense_net.apply(
            {"params": pd, **state}, e, method=per_block, mutable=["batch_stats"]
        )
        return sum(
            jnp.mean(
                jnp.sum(optax.sigmoid_binary_cross_entropy(z, jnp.asarray(p, jnp.float32)), -1)
            )
            for z in (a, b)
        )

    g1, g2 = jax.grad(aux_of)(params["dense"]), jax.grad(aux_fixed)(params["dense"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)

    _, one_block = model_of("finalnet", block_type="1B")
    p1, s1 = one_block.init(jax.random.key(0))
    assert float(one_block.dense(p1["dense"], s1, e, train=True)[2]) == 0.0


def test_finalnet_gating_and_factorized_interaction_formula():
    config, model = model_of("finalnet", block_type="1B", use_bn=False)
    params, _ = model.init(jax.random.key(0))
    params = jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), params
    )
    e = jax.random.normal(jax.random.key(1), (3, 8, config.model.embed_dim))
    got = model.dense_net.apply(
        {"params": params["dense"]}, e, method=lambda m, e: m.backbone(e, False)
    )
    p = jax.tree.map(np.asarray, params["dense"]["backbone"])
    en = np.asarray(e)
    # torch: Linear(F, F) on e.transpose(1, 2), i.e. x W^T + b over the field axis.
    gates = (en.transpose(0, 2, 1) @ p["gating"]["w"].T + p["gating"]["c"]).transpose(0, 2, 1)
    x = np.concatenate([en, en * gates], axis=1).reshape(3, -1)
    for i in range(len(config.model.finalnet.block1_hidden)):
        h = (
            x @ p["block1"][f"fi_{i}"]["linear"]["kernel"]
            + p["block1"][f"fi_{i}"]["linear"]["bias"]
        )
        half = h.shape[1] // 2
        h2, h1 = h[:, :half], h[:, half:]  # torch.chunk: the first chunk is named h2
        x = np.concatenate([h2, h1 * h2], axis=1)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_wukong_layer_formula():
    from diet_jax.models.wukong import WuKongLayer

    b, n, d = 2, 3, 4
    x = jax.random.normal(jax.random.key(0), (b, n, d))
    layer = WuKongLayer(lcb_features=2, fmb_features=2, rank_k=2, fmb_hidden=(5,))
    p = layer.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(lambda a: a + 0.1, p)
    got = layer.apply({"params": p}, x)
    fmb = FactorizationMachineBlock(2, rank_k=2, hidden=(5,)).apply({"params": p["fmb"]}, x)
    xn = np.asarray(x)
    lcb = np.einsum("bnd,nl->bld", xn, p["lcb"]["kernel"])  # Linear(n, n_lcb) over features
    res = np.einsum("bnd,no->bod", xn, p["residual"]["kernel"]) + p["residual"]["bias"][:, None]
    out = np.concatenate([np.asarray(fmb), lcb], axis=1) + res
    out = (out - out.mean(-1, keepdims=True)) / np.sqrt(out.var(-1, keepdims=True) + 1e-5)
    out = out * p["ln"]["scale"] + p["ln"]["bias"]
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-5)


def test_crossnetmix_matches_loop_over_experts():
    b, d, L, r, E = 5, 12, 2, 3, 4
    x0 = jax.random.normal(jax.random.key(0), (b, d))
    net = CrossNetMix(L, r, E)
    p = net.init(jax.random.key(1), x0)["params"]
    p = jax.tree.map(lambda a: a + 0.1, p)  # nonzero biases
    got = net.apply({"params": p}, x0)
    x0n, xl = np.asarray(x0, np.float64), np.asarray(x0, np.float64)
    for i in range(L):
        outs, scores = [], []
        for e in range(E):
            scores.append(xl @ np.asarray(p["gates"])[:, e])
            v = np.tanh(xl @ np.asarray(p[f"V_{i}"])[e])
            v = np.tanh(v @ np.asarray(p[f"C_{i}"])[e].T)
            outs.append(x0n * (v @ np.asarray(p[f"U_{i}"])[e].T + np.asarray(p[f"b_{i}"])))
        s = np.stack(scores, 1)
        g = np.exp(s - s.max(1, keepdims=True))
        g /= g.sum(1, keepdims=True)
        xl = xl + np.einsum("be,ebd->bd", g, np.stack(outs))
    np.testing.assert_allclose(got, xl, rtol=1e-4, atol=1e-5)


def test_crossnetv2_formula():
    config, model = model_of("dcnv2", structure="crossnet_only")
    params, _ = model.init(jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.05, params)  # nonzero biases
    x0 = jax.random.normal(jax.random.key(1), (4, 8 * config.model.embed_dim))
    cross = params["dense"]["backbone"]["cross"]
    xl = np.asarray(x0)
    for i in range(config.model.dcnv2.num_cross_layers):
        w, bias = np.asarray(cross[f"w_{i}"]["kernel"]), np.asarray(cross[f"w_{i}"]["bias"])
        xl = xl + np.asarray(x0) * (xl @ w + bias)
    got = model.dense_net.apply(
        {"params": params["dense"]},
        x0.reshape(4, 8, -1),
        method=lambda m, e: m.backbone(e, False),
    )
    np.testing.assert_allclose(got, xl, rtol=1e-5, atol=1e-5)


def test_interaction_aggregation_per_head_bilinear():
    b, dx, dy, o, h = 3, 6, 4, 5, 2
    x = jax.random.normal(jax.random.key(0), (b, dx))
    y = jax.random.normal(jax.random.key(1), (b, dy))
    agg = InteractionAggregation(o, h)
    p = agg.init(jax.random.key(2), x, y)["params"]
    got = agg.apply({"params": p}, x, y)
    want = x @ p["w_x"]["kernel"] + p["w_x"]["bias"] + y @ p["w_y"]["kernel"] + p["w_y"]["bias"]
    w = np.asarray(p["w_xy"])  # (H, dx/H, o, dy/H), torch's view of w_xy
    for j in range(h):
        xh = np.asarray(x)[:, j * dx // h : (j + 1) * dx // h]
        yh = np.asarray(y)[:, j * dy // h : (j + 1) * dy // h]
        for k in range(o):
            want = want.at[:, k].add(np.einsum("bi,ij,bj->b", xh, w[j, :, k, :], yh))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fast_formulations_equal_the_previous_ones():
    """FinalMLP's per-head fusion and WuKong's LayerNorm against the formulations they replaced
    (a batched einsum over heads; flax's nn.LayerNorm): same outputs and same gradients."""
    import flax.linen as nn

    from diet_jax.models.wukong import LayerNormAxis

    def close(a, b):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)

    b, dx, dy, o, h = 4, 8, 6, 3, 2
    x = jax.random.normal(jax.random.key(0), (b, dx))
    y = jax.random.normal(jax.random.key(1), (b, dy))
    agg = InteractionAggregation(o, h)
    p = jax.tree.map(lambda a: a + 0.1, agg.init(jax.random.key(2), x, y)["params"])

    def einsum_fusion(p, x, y):
        out = x @ p["w_x"]["kernel"] + p["w_x"]["bias"] + y @ p["w_y"]["kernel"] + p["w_y"]["bias"]
        t = jnp.einsum("bhx,hxoy->bhoy", x.reshape(b, h, -1), p["w_xy"])
        return out + jnp.einsum("bhoy,bhy->bo", t, y.reshape(b, h, -1))

    def fused(p, x, y):
        return agg.apply({"params": p}, x, y)

    close(fused(p, x, y), einsum_fusion(p, x, y))

    def grad(f, *args):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)

    close(grad(fused, p, x, y), grad(einsum_fusion, p, x, y))

    x3 = 3.0 + jax.random.normal(jax.random.key(3), (3, 5, 4))
    ln = {"scale": jnp.linspace(0.5, 2.0, 4), "bias": jnp.linspace(-1.0, 1.0, 4)}

    def ours(p, x):
        return LayerNormAxis().apply({"params": p}, x)

    def flax_ln(p, x):
        return nn.LayerNorm(epsilon=1e-5).apply({"params": p}, x)

    close(ours(ln, x3), flax_ln(ln, x3))
    close(grad(ours, ln, x3), grad(flax_ln, ln, x3))


def test_wukong_fm_block_is_rank_k_factorization_machine():
    b, n, d, k = 3, 5, 4, 2
    x = jax.random.normal(jax.random.key(0), (b, n, d))
    fmb = FactorizationMachineBlock(num_features=3, rank_k=k, hidden=(7,))
    p = fmb.init(jax.random.key(1), x)["params"]
    y = np.asarray(p["proj_y"])
    fm = np.einsum("bnd,bmd,mk->bnk", x, x, y).reshape(b, -1)  # (X X^T) Y, the unoptimised order
    z = (fm - fm.mean(1, keepdims=True)) / np.sqrt(fm.var(1, keepdims=True) + 1e-5)
    z = z * np.asarray(p["ln"]["scale"]) + np.asarray(p["ln"]["bias"])
    z = np.maximum(z @ p["mlp"]["dense_0"]["kernel"] + p["mlp"]["dense_0"]["bias"], 0)
    z = np.maximum(z @ p["mlp"]["out"]["kernel"] + p["mlp"]["out"]["bias"], 0)
    np.testing.assert_allclose(
        fmb.apply({"params": p}, x), z.reshape(b, 3, d), rtol=1e-4, atol=1e-5
    )


def test_reference_initialisation():
    config, model = model_of("finalnet")
    p = model.init(jax.random.key(0))[0]["dense"]["backbone"]
    np.testing.assert_array_equal(p["gating"]["w"], 0.0)  # FinalNet gates start at identity
    np.testing.assert_array_equal(p["gating"]["c"], 1.0)
    _, model = model_of("finalmlp")
    p = model.init(jax.random.key(0))[0]["dense"]["backbone"]
    np.testing.assert_array_equal(p["fs1"]["ctx_bias"], 0.0)
    # Untruncated xavier normal: std sqrt(2 / (fan_in + fan_out)) with torch's fans on 3-D U, V, C.
    d, r, e = 256, 32, 4
    pm = CrossNetMix(1, r, e).init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    for key, fans in (("U_0", d * r + e * r), ("C_0", r * r + e * r)):
        v = np.asarray(pm[key]).ravel()
        assert abs(v.std() / math.sqrt(2 / fans) - 1) < 0.05
        assert np.abs(v).max() > 2.5 * v.std()  # not truncated at 2 std
    assert abs(np.asarray(pm["gates"]).std() / math.sqrt(2 / (d + 1)) - 1) < 0.1
    fmb = FactorizationMachineBlock(2, rank_k=64).init(jax.random.key(0), jnp.zeros((1, 64, 4)))
    assert abs(np.asarray(fmb["params"]["proj_y"]).std() - 1) < 0.05  # torch.randn


def test_invalid_configurations_fail_clearly():
    config = load_config("synthetic", "tiny")
    with pytest.raises(ValueError, match="Unsupported backbone"):
        build_backbone("deepfm", config.model)
    e = jnp.zeros((2, 8, config.model.embed_dim))
    bad = [
        ("dcnv2", {"structure": "zigzag"}, "structure"),
        ("finalnet", {"block2_hidden": (16, 8)}, "must be equal"),
        ("finalnet", {"block1_hidden": (15,), "block2_hidden": (15,)}, "even"),
        ("finalnet", {"block_type": "3B"}, "block_type"),
        ("finalmlp", {"num_heads": 3}, "divisible"),
        ("finalmlp", {"fs1_context": (8,)}, "out of range"),
    ]
    for name, overrides, msg in bad:
        _, model = model_of(name, **overrides)
        with pytest.raises(ValueError, match=msg):
            model.dense_net.init(jax.random.key(0), e)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", MODELS)
def test_tiny_training_lowers_loss_and_beats_chance(name, tiny_store):
    """Two passes over the three tiny historical stages (138 steps of 256 rows)."""
    config = load_config("synthetic", "tiny")
    fmap, bs = tiny_store.feature_map, config.train.batch_size
    model = build_model(config.model, fmap, name)
    tx = make_optimizer(config.train)
    params, state = model.init(jax.random.key(config.seed))
    predict = make_predict_step(model)
    test = tiny_store.stages("test")[0]
    before = evaluate(predict, params, state, test, config.train.eval_batch_size, fmap.tasks)
    first = tiny_store.stages("historical")[0]
    logits0 = model.apply(params, state, jnp.asarray(first.x_NxF[:bs]), train=True)[0]
    loss0 = float(jnp.mean(bce_per_sample(logits0, jnp.asarray(first.y_NxK[:bs]))))

    ts, step = create_train_state(params, state, tx), make_train_step(model, tx)
    for epoch in range(2):
        for stage in tiny_store.stages("historical"):
            ts, info = train_epoch(
                step, ts, stage, batch_size=bs, seed=0, epoch=epoch, progress=False
            )
    after = evaluate(
        predict, ts.params, ts.model_state, test, config.train.eval_batch_size, fmap.tasks
    )
    assert info["loss"] < 0.75 * loss0, (loss0, info["loss"])
    assert after["logloss"] < before["logloss"] - 0.1
    assert after["auc"] > 0.58, after
    assert all(t["auc"] > 0.53 for t in after["per_task"].values()), after
