"""Evaluation: fidelity figures, selection baselines and the candidate protocol."""

import dataclasses
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diet_jax import baselines
from diet_jax.evaluate import fidelity
from tests.conftest import ROOT


def test_spearman_and_kendall_match_hand_computation():
    a = [0.70, 0.72, 0.71, 0.75, 0.74]
    b = [0.60, 0.65, 0.61, 0.66, 0.67]
    # ranks a: 1 3 2 5 4; ranks b: 1 3 2 4 5 -> d^2 = 0+0+0+1+1 = 2 -> rho = 1 - 6*2/(5*24) = 0.9
    assert fidelity.spearman(a, b) == pytest.approx(0.9)
    # 10 pairs, one discordant (models 4 and 5): tau = (9 - 1) / 10
    assert fidelity.kendall(a, b) == pytest.approx(0.8)
    assert fidelity.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert fidelity.kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_with_ties_matches_brute_force():
    a = np.array([1, 2, 2, 3, 4, 4])
    b = np.array([2, 1, 3, 3, 5, 4])
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(6), 2):
        s = np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
        conc += s > 0
        disc += s < 0
        ties_a += a[i] == a[j]
        ties_b += b[i] == b[j]
    n0 = 15
    expected = (conc - disc) / np.sqrt((n0 - ties_a) * (n0 - ties_b))
    assert fidelity.kendall(a, b) == pytest.approx(expected)
    # Spearman with ties: Pearson of average ranks.
    ra = np.array([1, 2.5, 2.5, 4, 5.5, 5.5])
    rb = np.array([2, 1, 3.5, 3.5, 6, 5])
    assert fidelity.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_fidelity_table_cost_ratio_and_correlations():
    def r(method, model, auc, secs):
        return {"method": method, "model": model, "auc": auc, "train_seconds": secs}

    results = [
        r("full_data", "dcn", 0.70, 100.0),
        r("full_data", "wukong", 0.72, 200.0),
        r("full_data", "finalmlp", 0.71, 100.0),
        r("diet", "dcn", 0.69, 10.0),
        r("diet", "wukong", 0.715, 20.0),
        r("diet", "finalmlp", 0.70, 10.0),
        r("random", "dcn", 0.69, 40.0),
        r("random", "wukong", 0.68, 40.0),
        r("reference", "dcn", 0.7, 1.0),
    ]
    table = fidelity.fidelity_table(results)
    assert set(table) == {"diet", "random"}
    assert table["diet"]["cost_ratio"] == pytest.approx(400 / 40)
    assert table["diet"]["spearman"] == pytest.approx(1.0)
    assert table["diet"]["kendall"] == pytest.approx(1.0)
    assert table["random"]["models"] == ["dcn", "wukong"]
    assert table["random"]["kendall"] == pytest.approx(-1.0)
    assert table["random"]["cost_ratio"] == pytest.approx(300 / 80)
    assert table["diet"]["mean_auc_gap"] == pytest.approx(np.mean([-0.01, -0.005, -0.01]))


def test_noise_ceiling_is_full_datas_leave_one_seed_out_agreement():
    def r(model, aucs, method="full_data"):
        return {"method": method, "model": model, "per_seed": [{"auc": a} for a in aucs]}

    # Seed 0 ranks a < b < c, seed 1 a < c < b: one discordant pair of three, both ways round.
    results = [
        r("a", [0.1, 0.1]),
        r("b", [0.2, 0.3]),
        r("c", [0.3, 0.2]),
        r("a", [0.9, 0.9], "diet"),
    ]
    ceiling = fidelity.noise_ceiling(results)
    assert ceiling["kendall_leave_one_seed_out"] == pytest.approx([1 / 3, 1 / 3])
    assert ceiling["kendall"] == pytest.approx(1 / 3)
    assert ceiling["spearman"] == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert ceiling["models"] == ["a", "b", "c"]
    # Three seeds: seed 2 against the mean of seeds 0 and 1 (a 0.1, b 0.25, c 0.25: a tie).
    three = [r("a", [0.1, 0.1, 0.3]), r("b", [0.2, 0.3, 0.1]), r("c", [0.3, 0.2, 0.2])]
    taus = fidelity.noise_ceiling(three)["kendall_leave_one_seed_out"]
    assert taus[2] == pytest.approx(fidelity.kendall([0.3, 0.1, 0.2], [0.1, 0.25, 0.25]))
    assert taus[2] == pytest.approx(-2 / np.sqrt(3 * 2))
    assert fidelity.noise_ceiling([r("a", [0.1]), r("b", [0.2])]) == {}
    # Every method's own agreement, in the fidelity table: DIET with itself here.
    diet = [r("a", [0.1, 0.1], "diet"), r("b", [0.2, 0.3], "diet"), r("c", [0.3, 0.2], "diet")]
    for e in results[:3] + diet:
        e["auc"], e["train_seconds"] = np.mean([p["auc"] for p in e["per_seed"]]), 1.0
    table = fidelity.fidelity_table(results[:3] + diet, bootstrap=0)
    assert table["diet"]["seed_kendall"] == pytest.approx(1 / 3)


def test_single_seed_kendall_by_hand():
    """fidelity_table's single_seed_kendall: each seed of the method against the reference's
    seed means, averaged. Here one seed ranks a < b < c like Full Data (+1), the other the
    reverse (-1): 0, while the seed means (a 0.175, b = c 0.2) give tau-b 2 / sqrt(6)."""

    def r(model, aucs, method):
        return {
            "method": method,
            "model": model,
            "per_seed": [{"auc": a} for a in aucs],
            "auc": float(np.mean(aucs)),
            "train_seconds": 1.0,
        }

    rows = [
        r("a", [0.1, 0.1], "full_data"),
        r("b", [0.2, 0.2], "full_data"),
        r("c", [0.3, 0.3], "full_data"),
        r("a", [0.1, 0.25], "diet"),
        r("b", [0.2, 0.2], "diet"),
        r("c", [0.3, 0.1], "diet"),
    ]
    f = fidelity.fidelity_table(rows, bootstrap=0)["diet"]
    assert f["single_seed_kendall"] == pytest.approx(0.0)
    assert f["kendall"] == pytest.approx(2 / np.sqrt(6))
    one = [dict(x, per_seed=x["per_seed"][:1]) for x in rows]  # one seed: no such figure
    assert "single_seed_kendall" not in fidelity.fidelity_table(one, bootstrap=0)["diet"]


def test_spread_and_noise_by_hand():
    """fidelity.spread_and_noise: seed noise = rms of the seed stds; true spread = the seed
    means' std less the noise's share noise^2 / S; SNR = true spread / (noise / sqrt S)."""
    # Three candidates, 2 seeds: means 0.60, 0.62, 0.64; seed stds 0.01, 0.02, 0.02 (ddof 1).
    half = np.array([[-1.0, 1.0]]) * np.array([[0.01], [0.02], [0.02]]) / np.sqrt(2)
    auc = np.array([[0.60], [0.62], [0.64]]) + half
    got = fidelity.spread_and_noise(auc)
    noise2 = (0.01**2 + 0.02**2 + 0.02**2) / 3
    true2 = 0.02**2 - noise2 / 2  # the means' sample variance is 0.02^2
    assert got["seed_noise_std"] == pytest.approx(np.sqrt(noise2))
    assert got["observed_spread_std"] == pytest.approx(0.02)
    assert got["true_spread_std"] == pytest.approx(np.sqrt(true2))
    assert got["snr"] == pytest.approx(np.sqrt(true2) / np.sqrt(noise2 / 2))
    # Noise larger than the spread: no true spread left, SNR 0.
    assert fidelity.spread_and_noise(auc * 0 + 0.6 + half * 10)["true_spread_std"] == 0.0
    assert fidelity.spread_and_noise(auc[:, :1]) == {}
    # In the fidelity table, per method, from its per-seed AUCs.
    rows = [
        {
            "method": m,
            "model": f"c{c}",
            "auc": float(auc[c].mean()),
            "train_seconds": 1.0,
            "per_seed": [{"seed": s, "auc": float(auc[c, s])} for s in range(2)],
        }
        for m in ("full_data", "diet")
        for c in range(3)
    ]
    f = fidelity.fidelity_table(rows, bootstrap=0)["diet"]
    assert f["seed_noise_std"] == pytest.approx(np.sqrt(noise2))
    assert f["snr"] == pytest.approx(got["snr"])


def test_faithful_tau_by_hand():
    """fidelity.faithful_tau: the tau of two independent S-seed means around the reference's
    shrunk true means. Two candidates: tau is +1 when both draws order them alike, so its mean
    is (2p - 1)^2 with p = Phi(delta / (sigma sqrt(2 / S))), delta the shrunk difference."""
    import math

    # Two candidates, 4 seeds: means 0.60 and 0.61, seed std 0.01 each (sample, ddof 1).
    base = np.array([-1.0, 1.0, -1.0, 1.0]) * 0.01 * np.sqrt(3 / 4)
    auc = np.stack([0.60 + base, 0.61 + base[::-1]])
    s = 4
    observed = np.var([0.60, 0.61], ddof=1)
    true_var = observed - 0.01**2 / s
    delta = 0.01 * np.sqrt(true_var / observed)
    p = 0.5 * (1 + math.erf(delta / (0.01 * np.sqrt(2 / s)) / math.sqrt(2)))
    got = fidelity.faithful_tau(auc, draws=40_000, seed=1)
    assert got["seeds"] == 4
    assert got["true_spread_std"] == pytest.approx(np.sqrt(true_var))
    assert got["mean"] == pytest.approx((2 * p - 1) ** 2, abs=0.01)
    # No seed noise: every draw ranks like the reference.
    exact = np.repeat(np.array([[0.1], [0.3], [0.2]]), 3, axis=1)
    assert fidelity.faithful_tau(exact)["mean"] == 1.0
    assert fidelity.faithful_tau(exact)["interval"] == [1.0, 1.0]
    # Noise that explains the whole spread: no true differences, tau centred on 0.
    rng = np.random.default_rng(0)
    flat = 0.6 + rng.normal(size=(12, 3)) * 0.01
    flat -= flat.mean(1, keepdims=True) - 0.6  # identical seed means
    none = fidelity.faithful_tau(flat, draws=4000)
    assert none["true_spread_std"] == 0.0 and abs(none["mean"]) < 0.02
    assert fidelity.faithful_tau(np.ones((3, 1))) == {}
    # noise_ceiling carries it for Full Data.
    rows = [
        {"method": "full_data", "model": m, "per_seed": [{"auc": a} for a in auc[i]]}
        for i, m in enumerate(["a", "b"])
    ]
    assert fidelity.noise_ceiling(rows)["faithful_kendall"]["mean"] == pytest.approx(
        got["mean"], abs=0.02
    )


def test_random_rows_exact_count_distinct_and_seeded():
    idx = baselines.random_rows(1000, 37, seed=3)
    assert idx.size == 37 and np.unique(idx).size == 37 and (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(idx, baselines.random_rows(1000, 37, seed=3))


def test_kmeans_finds_separated_clusters_and_selection_is_exact():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [50, 100, 150]
    x = np.concatenate(
        [rng.normal(c, 0.1, (s, 2)) for c, s in zip(centers, sizes, strict=True)]
    ).astype(np.float32)
    c, assign, dist = baselines.kmeans(x, jax.random.key(1), k=3, iters=10)
    found = np.asarray(c)[np.argsort(np.asarray(c)[:, 0] + 100 * np.asarray(c)[:, 1])]
    np.testing.assert_allclose(found, centers[[0, 1, 2]], atol=0.1)
    # Squared distances are right.
    np.testing.assert_allclose(
        np.asarray(dist), ((x - np.asarray(c)[np.asarray(assign)]) ** 2).sum(1), atol=1e-4
    )
    for n in (1, 7, 30, 299):
        idx = baselines.kmeans_rows(x, n, k=3, iters=10, seed=0)
        assert idx.size == n and np.unique(idx).size == n


def test_nearest_to_centroids_quota_and_order():
    assign = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    dist = np.array([4, 1, 3, 2, 9, 8, 6, 5, 4, 3, 2, 1], dtype=float)
    # n=6 over sizes 4,2,6 -> exact 2,1,3 -> nearest 2 of cluster 0, 1 of cluster 1, 3 of cluster 2.
    idx = baselines.nearest_to_centroids(assign, dist, 3, 6)
    np.testing.assert_array_equal(idx, [1, 3, 5, 9, 10, 11])


# ---------------------------------------------------------------- the protocol on the tiny run


@pytest.fixture(scope="module")
def tiny_reference(tiny_run):
    from diet_jax.data.store import StageStore
    from diet_jax.train.reference import train_reference
    from tests.conftest import load_config

    workdir, _ = tiny_run
    config = load_config("synthetic", "tiny")
    store = StageStore(os.path.join(workdir, "data"))
    return config, store, train_reference(config, store, workdir)  # restored, not retrained


@pytest.mark.parametrize("method", ["random", "el2n", "kmeans"])
def test_selection_baselines_return_exactly_the_budget(method, tiny_reference):
    from diet_jax.distill import phase1
    from diet_jax.evaluate import methods

    config, store, ref = tiny_reference
    mem = methods.selection_memory(method, config, store, ref)
    sizes = [
        phase1.budget(s.rows, config.ratio)
        for s in store.feature_map.stages_with_role("historical")
    ]
    assert len(mem) == sum(sizes)
    origin = np.asarray(mem.origin_N)
    assert [int((origin == t).sum()) for t in (1, 2, 3)] == sizes
    # Rows are distinct within a stage and converted by that stage's teacher.
    rows = np.asarray(mem.row_N)
    for t in (1, 2, 3):
        assert np.unique(rows[origin == t]).size == sizes[t - 1]
    teacher = ref.stage_state(2)
    x = np.asarray(store.stage("stage_2").x_NxF)[rows[origin == 2]]
    np.testing.assert_allclose(
        np.asarray(mem.e_NxFxD)[origin == 2],
        np.asarray(ref.model.embed(teacher.params["embed"], x)),
        rtol=1e-6,
    )


def test_candidate_inherits_teacher_embeddings_and_keeps_the_best_epoch(
    tiny_reference, monkeypatch
):
    from diet_jax.evaluate import methods, protocol
    from diet_jax.models import build_model
    from diet_jax.train import loop

    config, store, ref = tiny_reference
    mem = methods.selection_memory("random", config, store, ref)
    model = build_model(config.model, store.feature_map, name="dcn")
    teacher_embed = ref.final.params["embed"]

    params_dense, state, info, seconds, samples = protocol.train_on_rows(
        model, teacher_embed, mem.trainable(), store, config, seed=0
    )
    assert info["best_epoch"] == int(np.argmax(info["val_auc_per_epoch"]))
    assert len(info["val_auc_per_epoch"]) == config.evaluate.max_epochs
    assert samples == config.evaluate.max_epochs * len(mem) and seconds > 0
    val = loop.evaluate(
        protocol._predict_step(model),
        {"embed": teacher_embed, "dense": params_dense},
        state,
        store.stages("validation")[0],
        config.train.eval_batch_size,
        store.feature_map.tasks,
    )
    assert val["auc"] == pytest.approx(max(info["val_auc_per_epoch"]), abs=1e-9)

    seen = {}
    real_finetune = protocol.finetune_and_test

    def spy(model, params, state, store, config, seed, stages, **kw):
        seen["embed"] = jax.tree.map(np.array, params["embed"])
        seen["stages"] = stages
        return real_finetune(model, params, state, store, config, seed, stages, **kw)

    monkeypatch.setattr(protocol, "finetune_and_test", spy)
    out = protocol.run_candidate(
        "random", model, store, config, teacher_embed, mem.trainable(), seed=0
    )
    jax.tree.map(
        np.testing.assert_array_equal, seen["embed"], jax.tree.map(np.asarray, teacher_embed)
    )
    assert seen["stages"] == ["subsequent"]
    assert (
        out.train_samples
        == config.evaluate.max_epochs * len(mem)
        + (3000 // config.train.batch_size) * config.train.batch_size
    )
    # The teacher's table itself is untouched by the fine-tune (it trained on a copy).
    jax.tree.map(
        np.testing.assert_array_equal,
        seen["embed"],
        jax.tree.map(np.asarray, ref.final.params["embed"]),
    )


def test_finetune_continues_the_teachers_table_optimizer_state(tiny_reference):
    from diet_jax.evaluate import protocol
    from diet_jax.models import build_model
    from diet_jax.train import steps

    config, store, ref = tiny_reference
    model = build_model(config.model, store.feature_map, name="dcn")
    opt = protocol.inherited_embed_opt(ref.final, config)
    assert opt is ref.final.opt_state["embed"]  # rowwise_adagrad in `:tiny` too
    off = config.copy_and_resolve_references()
    off.evaluate.inherit_optimizer = False
    assert protocol.inherited_embed_opt(ref.final, off) is None

    # What the fine-tune starts from: spy on the trainer's first step.
    seen = []
    real = protocol._trainer

    def spy_trainer(model, train_cfg):
        t = real(model, train_cfg)

        def step(state, batch):
            if not seen:
                seen.append(jax.tree.map(np.array, state.opt_state["embed"]))
            return t.step(state, batch)

        return steps.Trainer(t.init, step)

    params_dense, state = model.init_dense(jax.random.key(0))
    params = {"embed": ref.final.params["embed"], "dense": params_dense}
    protocol._WARM.clear()
    try:
        protocol._trainer = spy_trainer
        protocol.finetune_and_test(
            model, params, state, store, config, 0, ["subsequent"], embed_opt=opt
        )
    finally:
        protocol._trainer = real
        protocol._WARM.clear()
    jax.tree.map(np.testing.assert_array_equal, seen[0], jax.tree.map(np.asarray, opt))
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(seen[0])) > 0  # not a fresh one
    # A state of another shape is refused, naming the candidate.
    bad = jax.tree.map(lambda a: a[:1], opt)
    with pytest.raises(ValueError, match="dcn: the inherited table optimizer state"):
        protocol.finetune_and_test(
            model, params, state, store, config, 0, ["subsequent"], embed_opt=bad
        )


def test_unknown_method_or_model_is_rejected_before_any_training(tiny_reference, tmp_path):
    from diet_jax.evaluate import methods

    config, store, ref = tiny_reference
    config = config.copy_and_resolve_references()  # the fixture's config is shared
    config.evaluate.methods = ("full_data", "dieet")
    res = {"results": [], "timings": {}}
    with pytest.raises(ValueError, match="dieet"):
        methods.run_all(config, store, ref, str(tmp_path), res, None)
    config.evaluate.methods = ("full_data",)
    config.evaluate.models = ("dcn", "wukongg")
    with pytest.raises(ValueError, match="wukongg"):
        methods.run_all(config, store, ref, str(tmp_path), res, None)
    assert res["results"] == []


def test_every_method_is_timed_alike_without_compilation(tiny_reference):
    """Issue 16: the first method to train a model must not carry its compilation in its time."""
    import jax.numpy as jnp

    from diet_jax.evaluate import methods, protocol
    from diet_jax.models import build_model
    from diet_jax.train import group

    config, store, ref = tiny_reference
    config = config.copy_and_resolve_references()
    config.evaluate.lr_grid = (1e-3,)
    # The clock really sees compilations: a new function compiles inside a timed region.
    clock = protocol.TrainClock()
    with clock.timed():
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()
    assert clock.compiles > 0
    # Cold caches, so whichever method runs first meets every function for the first time.
    protocol._WARM_SIGNATURES.clear()
    protocol._WARM.clear()
    protocol._TRAINERS.clear()
    protocol._predict_step.cache_clear()
    group._group_fns.cache_clear()
    model = build_model(config.model, store.feature_map, name="dcn")
    rows = methods.selection_memory("random", config, store, ref).trainable()
    teacher_embed = ref.final.params["embed"]
    for method in ("random", "full_data", "cold_start", "warmup_start", "diet"):
        out = protocol.run_candidate(
            method,
            model,
            store,
            config,
            teacher_embed,
            rows if method in methods.REDUCED else None,
            0,
        )
        assert out.info["timed_compiles"] == 0, method
        assert out.train_seconds > 0
        assert out.info["historical_seconds"] + out.info["finetune_seconds"] == pytest.approx(
            out.train_seconds
        )


def test_warm_full_data_is_full_data_from_the_teachers_table(tiny_reference):
    """Warm Full Data trains every historical stage and the subsequent block (as Full Data) from
    the teacher's table and a fresh dense network (as Warmup Start): at a vanishing rate nothing
    moves, so its model is Warmup Start's, and not Full Data's (a random table)."""
    from diet_jax.evaluate import protocol
    from diet_jax.models import build_model

    config, store, ref = tiny_reference
    fmap = store.feature_map
    historical = [s.name for s in fmap.stages_with_role("historical")]
    subsequent = [s.name for s in fmap.stages_with_role("subsequent")]
    model = build_model(config.model, fmap, name="dcn")
    embed = ref.final.params["embed"]

    def run(method, cfg):
        return protocol.run_candidate(method, model, store, cfg, embed, None, 0)

    warm = run("warm_full_data", config)
    assert warm.info["stages"] == historical + subsequent
    assert warm.info["historical_epochs"] == 1 and warm.info["historical_seconds"] > 0
    assert warm.train_samples == run("full_data", config).train_samples
    still = config.copy_and_resolve_references()
    still.train.learning_rate = 1e-12  # the optimizers want a positive rate
    still.train.adagrad_learning_rate = 1e-12
    at_zero = {m: run(m, still).metrics["auc"] for m in ("warm_full_data", "warmup_start")}
    assert at_zero["warm_full_data"] == pytest.approx(at_zero["warmup_start"], abs=1e-6)
    assert abs(run("full_data", still).metrics["auc"] - at_zero["warmup_start"]) > 1e-3


def test_tiny_run_covers_the_pool_with_seed_keys_and_both_cost_ratios(tiny_run):
    from diet_jax.defaults import DEFAULT_METHODS

    workdir, res = tiny_run
    entries = [r for r in res["results"] if r["method"] != "reference"]
    assert len(DEFAULT_METHODS) == 7 and "warm_full_data" not in DEFAULT_METHODS
    assert {(r["method"], r["model"]) for r in entries} == {
        (m, c) for m in DEFAULT_METHODS for c in ("dcn", "dcn_narrow", "wukong")
    }
    for r in entries:
        assert r["seeds"] == [0] and len(r["per_seed"]) == 1 and r["auc_std"] == 0.0
        assert r["auc"] == r["per_seed"][0]["auc"]
        assert r["backbone"] == ("wukong" if r["model"] == "wukong" else "dcn")
    for info in res["candidate_info"].values():
        assert all(i["timed_compiles"] == 0 for i in info)
    diet = res["fidelity"]["diet"]
    assert {"kendall_ci", "cost_ratio_historical", "cost_ratio_end_to_end"} <= set(diet)
    assert np.isnan(res["fidelity"]["cold_start"]["cost_ratio_historical"])
    report = open(os.path.join(workdir, "report.md")).read()
    assert "Kendall tau [95% CI]" in report and "figure1.png" in report
    assert res["fidelity_ceiling"] == {}  # one seed in `:tiny`: no ceiling
    assert os.path.exists(os.path.join(workdir, "figure1.png"))


def _count_test_scorings(monkeypatch) -> list:
    """A list that gets one item each time the protocol scores a model on the test day."""
    from diet_jax.evaluate import protocol

    seen, real = [], protocol.loop.evaluate

    def spy(predict_step, params, model_state, stage, *args, **kw):
        if stage.name == "test":
            seen.append(stage.name)
        return real(predict_step, params, model_state, stage, *args, **kw)

    monkeypatch.setattr(protocol.loop, "evaluate", spy)
    return seen


def test_reference_lr_grid_picks_the_best_validation_rate(tiny_reference, monkeypatch):
    """evaluate.reference_lr_grid: Cold Start's rate is the argmax of the final models'
    validation AUCs on the first seed; that run is the first seed's result, and the other seeds
    train at the chosen rate."""
    from diet_jax.evaluate import protocol
    from diet_jax.models import build_model

    config, store, ref = tiny_reference
    config = config.copy_and_resolve_references()
    config.evaluate.reference_lr_grid = (1e-4, 3e-2)
    model = build_model(config.model, store.feature_map, name="dcn")
    calls = []
    real = protocol._reference_run

    def spy(method, model, store, config, embed, seed, *args, **kw):
        r = real(method, model, store, config, embed, seed, *args, **kw)
        calls.append((seed, r.info["lr"], r.info.get("val_auc"), r.metrics))
        return r

    monkeypatch.setattr(protocol, "_reference_run", spy)
    tested = _count_test_scorings(monkeypatch)
    outs = protocol.run_seeds(
        "cold_start", model, store, config, ref.final.params["embed"], None, [0, 1]
    )
    grid_runs = [c for c in calls if c[0] == 0]
    assert [c[1] for c in grid_runs] == [1e-4, 3e-2]
    best = int(np.argmax([c[2] for c in grid_runs]))
    chosen = grid_runs[best][1]
    assert outs[0].info["lr"] == chosen and outs[1].info["lr"] == chosen
    # The grid's runs are tested later, and only the chosen one: one test scoring a seed.
    assert all(callable(c[3]) for c in grid_runs) and len(tested) == 2
    assert outs[0].metrics["auc"] == grid_runs[best][3]()["auc"]  # the grid's run, not a retrain
    assert outs[0].info["lr_grid_val_auc"] == [c[2] for c in grid_runs]
    assert [c[:2] for c in calls[2:]] == [(1, chosen)]  # seed 1 once, at the chosen rate
    # The two rates really differ (else the test could not tell a wrong choice).
    assert grid_runs[0][2] != grid_runs[1][2]


def test_lr_select_final_picks_the_best_fine_tuned_rate(tiny_reference, monkeypatch):
    """evaluate.lr_select = "final": every rate of the grid is fine-tuned on the first seed, the
    rate whose final model has the best validation AUC is chosen, that fine-tune is the first
    seed's result, and the other seeds train and fine-tune once at the chosen rate."""
    from diet_jax.evaluate import methods, protocol
    from diet_jax.models import build_model

    config, store, ref = tiny_reference
    config = config.copy_and_resolve_references()
    config.evaluate.lr_grid = (1e-4, 3e-2)
    config.evaluate.lr_select = "final"
    config.evaluate.lr_select_top = 0  # every rate
    model = build_model(config.model, store.feature_map, name="dcn")
    rows = methods.selection_memory("random", config, store, ref).trainable()
    calls = []
    real = protocol.finetune_and_test

    def spy(model, params, state, store, config, seed, *args, timings, **kw):
        r = real(model, params, state, store, config, seed, *args, timings=timings, **kw)
        test = r[0] if isinstance(r[0], dict) else r[0]()  # a tried rate is tested on demand
        calls.append((seed, timings["validation"]["auc"], test["auc"]))
        return r

    monkeypatch.setattr(protocol, "finetune_and_test", spy)
    outs = protocol.run_seeds(
        "random", model, store, config, ref.final.params["embed"], {0: rows, 1: rows}, [0, 1]
    )
    assert [c[0] for c in calls] == [0, 0, 1]  # both rates on seed 0, then seed 1 once
    final = [c[1] for c in calls[:2]]
    assert final[0] != final[1]  # the rates really differ (else a wrong choice is invisible)
    best = int(np.argmax(final))
    assert outs[0].info["lr"] == outs[1].info["lr"] == (1e-4, 3e-2)[best]
    assert outs[0].info["lr_grid_final_val_auc"] == final
    assert outs[0].metrics["auc"] == calls[best][2]  # the grid's fine-tune, not a retrain
    assert outs[0].info["val_auc"] == final[best]


def test_lr_select_top_fine_tunes_only_the_best_rows_rates(tiny_reference, monkeypatch):
    """evaluate.lr_select_top = 2 of a 3-rate grid: the two rates whose rows epochs score best
    are fine-tuned (the third is not: None in lr_grid_final_val_auc), the better fine-tuned one
    wins; top 1 gives exactly the result of lr_select = "rows"."""
    from diet_jax.evaluate import methods, protocol
    from diet_jax.models import build_model

    config, store, ref = tiny_reference
    config = config.copy_and_resolve_references()
    config.evaluate.lr_grid = (1e-5, 3e-3, 3e-2)
    config.evaluate.lr_select = "final"
    config.evaluate.lr_select_top = 2
    model = build_model(config.model, store.feature_map, name="dcn")
    rows = methods.selection_memory("random", config, store, ref).trainable()
    embed = ref.final.params["embed"]
    tuned = []
    real = protocol.finetune_and_test

    def spy(*args, timings, **kw):
        r = real(*args, timings=timings, **kw)
        tuned.append(timings["validation"]["auc"])
        return r

    monkeypatch.setattr(protocol, "finetune_and_test", spy)
    tested = _count_test_scorings(monkeypatch)
    out = protocol.run_seeds("random", model, store, config, embed, {0: rows}, [0])[0]
    rows_auc = np.asarray(out.info["lr_grid_val_auc"])
    final = out.info["lr_grid_final_val_auc"]
    skipped = int(np.argmin(rows_auc))
    assert len(tuned) == 2 and final[skipped] is None
    assert len(tested) == 1  # two rates fine-tuned, only the chosen one tested
    assert sorted(x for x in final if x is not None) == sorted(tuned)
    best = int(np.nanargmax([np.nan if x is None else x for x in final]))
    assert out.info["lr"] == config.evaluate.lr_grid[best] and out.info["val_auc"] == final[best]
    config.evaluate.lr_select_top = 1
    one = protocol.run_seeds("random", model, store, config, embed, {0: rows}, [0])[0]
    config.evaluate.lr_select = "rows"
    by_rows = protocol.run_seeds("random", model, store, config, embed, {0: rows}, [0])[0]
    assert one.info["lr"] == by_rows.info["lr"] == config.evaluate.lr_grid[int(np.argmax(rows_auc))]
    assert one.metrics["auc"] == by_rows.metrics["auc"]


def test_precise_bn_statistics_are_the_mean_of_the_batch_statistics(tiny_reference):
    """loop.precise_batch_stats: (1) the mean over full batches of each batch's own statistics,
    recovered here independently from the model's running-average updates in train mode, batch
    after batch from the state it had; (2) on a stage of exactly one batch the eval-mode logits
    then equal the train-mode ones (the batch is normalized by its own statistics)."""
    from diet_jax.models import build_model
    from diet_jax.models.layers import BN_MOMENTUM
    from diet_jax.train import loop
    from diet_jax.train.steps import make_batch_stats_step

    config, store, ref = tiny_reference
    model = build_model(config.model, store.feature_map, name="wukong")  # top MLP BatchNorm
    params, state = model.init(jax.random.key(3))
    params = {**params, "embed": ref.final.params["embed"]}
    assert jax.tree.leaves(state)
    stage, bs = store.stage("subsequent"), 256
    n_full = len(stage) // bs
    stats_step = make_batch_stats_step(model, BN_MOMENTUM)
    precise = loop.precise_batch_stats(stats_step, params, state, stage, bs)

    m, running, total = BN_MOMENTUM, state, None
    x = np.asarray(stage.x_NxF)
    for b in range(n_full):
        new = model.apply(params, running, x[b * bs : (b + 1) * bs], train=True)[1]
        own = jax.tree.map(lambda r1, r0: (r1 - m * r0) / (1 - m), new, running)
        total = own if total is None else jax.tree.map(np.add, total, own)
        running = new
    want = jax.tree.map(lambda t: t / n_full, total)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), precise, want)
    # And it moved: the fresh state (mean 0, var 1) is not the data's.
    assert not np.allclose(jax.tree.leaves(precise)[0], jax.tree.leaves(state)[0])

    one = dataclasses.replace(stage, x_NxF=stage.x_NxF[:bs], y_NxK=stage.y_NxK[:bs])
    s1 = loop.precise_batch_stats(stats_step, params, state, one, bs)
    train_logits = model.apply(params, state, x[:bs], train=True)[0]
    eval_logits = model.apply(params, s1, x[:bs], train=False)[0]
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-4, atol=1e-4)


def test_finetune_continues_the_rows_phase_adam_moments():
    """protocol._continue_adam puts the rows phase's Adam moments and count in the fine-tune's
    dense optimizer state (the table's state untouched) and rejects another parameter layout."""
    import optax

    from diet_jax.evaluate import protocol
    from diet_jax.train import group

    dense = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    rows_opt = group.rows_tx(10.0).init(dense)
    adam = protocol.adam_moments(rows_opt)
    adam = adam._replace(
        count=jnp.asarray(7, adam.count.dtype),
        mu=jax.tree.map(lambda m: m + 0.5, adam.mu),
        nu=jax.tree.map(lambda v: v + 2.0, adam.nu),
    )
    ft = {"dense": optax.adam(1e-2).init(dense), "embed": {"acc": jnp.full((4,), 3.0)}}
    out = protocol._continue_adam(ft, adam, "m")
    got = protocol.adam_moments(out["dense"])
    assert int(got.count) == 7
    np.testing.assert_array_equal(got.mu["w"], np.full((3, 2), 0.5))
    np.testing.assert_array_equal(got.nu["b"], np.full((2,), 2.0))
    np.testing.assert_array_equal(out["embed"]["acc"], ft["embed"]["acc"])
    # The continued state drives optax.adam: its first update is Adam's from those moments at
    # step 8 (by hand), not the fresh state's lr * sign(g).
    g = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), dense)
    upd, _ = optax.adam(1e-2).update(g, out["dense"], dense)
    mu, nu = 0.9 * 0.5 + 0.1 * 1e-3, 0.999 * 2.0 + 0.001 * 1e-6
    want = -1e-2 * (mu / (1 - 0.9**8)) / (np.sqrt(nu / (1 - 0.999**8)) + 1e-8)
    np.testing.assert_allclose(upd["w"], np.full((3, 2), want), rtol=1e-5)
    fresh, _ = optax.adam(1e-2).update(g, ft["dense"], dense)
    np.testing.assert_allclose(fresh["w"], np.full((3, 2), -1e-2), rtol=1e-4)
    other = protocol.adam_moments(group.rows_tx(10.0).init({"w": jnp.ones((2, 2))}))
    with pytest.raises(ValueError, match="does not match"):
        protocol._continue_adam(ft, other, "m")


def test_lr_select_top_script_ranks_the_full_search_choice_by_the_rows_auc():
    """experiments/lr_select_top.py: the chosen rate's rank among the rates ordered by the rows'
    AUC, by hand on two entries; an entry of a top-k run (a rate not fine-tuned) is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lr_select_top", os.path.join(ROOT, "experiments", "lr_select_top.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    info = {
        # rows order: 2, 0, 1; the final models' best is rate 0: rank 1 (the second)
        "diet/a": [{"lr_grid_val_auc": [0.6, 0.5, 0.7], "lr_grid_final_val_auc": [0.9, 0.1, 0.8]}],
        "random/a": [{"lr_grid_val_auc": [0.6, 0.5, 0.7], "lr_grid_final_val_auc": [0, 0, 0.8]}],
        "full_data/a": [{"lr": 1e-3}],
    }
    assert script.choice_ranks(info) == {"diet/a": 1, "random/a": 0}
    info["diet/a"][0]["lr_grid_final_val_auc"][1] = None
    with pytest.raises(SystemExit, match="diet/a: some rates were not fine-tuned"):
        script.choice_ranks(info)


def test_fidelity_check_does_not_pass_the_selection_criterion_without_diet(tmp_path):
    """experiments/fidelity_check.py: "DIET above every selection on the pool mean" needs DIET
    and a selection in the run (a run without either passed it vacuously); with Warm Full Data
    in the run its tau is printed beside DIET's (the shared-table line). In a subprocess: the
    script defines absl flags that diet_jax.main, imported by other tests, also defines."""
    import json
    import subprocess

    from diet_jax import results as results_lib

    def row(method, model, auc):
        return {"method": method, "model": model, "auc": auc, "train_seconds": 1.0}

    def card(methods: dict) -> tuple[dict, str]:
        models = ("dcn", "wukong")
        rows = [row(m, c, a) for m, a2 in methods.items() for c, a in zip(models, a2, strict=True)]
        workdir = tmp_path / "_".join(methods)
        workdir.mkdir()
        res = {"results": rows, "fidelity": fidelity.fidelity_table(rows, bootstrap=0)}
        results_lib.save(str(workdir), res)
        out = workdir / "card.json"
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "experiments", "fidelity_check.py"),
             f"--workdir={workdir}", f"--json_out={out}"],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )  # fmt: skip
        return json.loads(out.read_text())["criteria"], done.stdout

    key = "diet_above_every_selection_on_pool_mean"
    full = {"full_data": (0.70, 0.71)}
    crit, _ = card({**full, "random": (0.68, 0.69)})  # no DIET
    assert crit[key]["pass"] is False
    crit, _ = card({**full, "diet": (0.69, 0.70)})  # no selection
    assert crit[key]["pass"] is False
    crit, text = card({**full, "diet": (0.69, 0.70), "random": (0.68, 0.69)})
    assert crit[key]["pass"] is True and "Shared-table reference" not in text
    crit, text = card(
        {**full, "diet": (0.69, 0.70), "random": (0.68, 0.69), "warm_full_data": (0.71, 0.70)}
    )
    assert "(warm_full_data) ranks the pool with Kendall tau -1.000, DIET 1.000" in text


def test_candidate_ranks_spreads_and_size_correlation_by_hand():
    """fidelity.candidate_ranks (experiments/rank_by_candidate.py) on three candidates: ranks in
    Full Data's order, spread, seed std, tau and Spearman against log(params), by hand."""
    from diet_jax.evaluate import fidelity

    params = {"a": 10, "b": 1000, "c": 100}
    auc = {"full_data": (0.70, 0.60, 0.65), "diet": (0.60, 0.64, 0.62)}  # DIET: the reverse
    rows = [
        {"method": m, "model": c, "auc": auc[m][i], "auc_std": 0.01 if m == "diet" else 0.02}
        for m in auc
        for i, c in enumerate("abc")
    ]
    t = fidelity.candidate_ranks(rows, params, ("full_data", "random", "diet"))
    assert t["methods"] == ["full_data", "diet"]  # Random has no entry: left out
    assert t["models"] == ["a", "c", "b"]  # Full Data's order: 0.70, 0.65, 0.60
    assert t["rank"] == {"full_data": [1.0, 2.0, 3.0], "diet": [3.0, 2.0, 1.0]}
    np.testing.assert_allclose(t["auc"]["diet"], [0.60, 0.62, 0.64])
    full, diet = t["summary"]["full_data"], t["summary"]["diet"]
    np.testing.assert_allclose([full["spread"], full["seed_std"]], [0.10, 0.02])
    np.testing.assert_allclose([diet["spread"], diet["seed_std"]], [0.04, 0.01])
    # log params a < c < b: Full Data's AUCs fall with size (-1), DIET's rise (+1).
    assert (full["kendall"], full["size_spearman"]) == (1.0, -1.0)
    assert (diet["kendall"], diet["size_spearman"]) == (-1.0, 1.0)
    with pytest.raises(ValueError, match="No Full Data"):
        fidelity.candidate_ranks(rows[3:], params, ("full_data", "diet"))


def test_fidelity_check_splits_validation_auc_into_rows_phase_and_fine_tune():
    """fidelity.phase_split (fidelity_check.py's last table): per method, the pool mean over
    candidates (and runs) of the seeds' best rows epoch and of their final models, and each
    phase's Kendall tau against Full Data over the candidates, by hand."""
    from diet_jax.evaluate import fidelity

    run1 = {
        "diet/a": [
            {"val_auc_per_epoch": [0.5, 0.7, float("nan")], "val_auc": 0.8},
            {"val_auc_per_epoch": [0.6, 0.5], "val_auc": 0.6},
        ],
        "diet/b": [{"val_auc_per_epoch": [0.9], "val_auc": 0.55}],
        "full_data/a": [{"val_auc": 0.99}],
        "full_data/b": [{"val_auc": 0.5}],
    }
    run2 = {"diet/a": [{"val_auc_per_epoch": [0.4], "val_auc": 0.5}]}
    got = fidelity.phase_split([run1, run2])
    assert set(got) == {"diet"}  # full_data has no rows phase; absent methods are left out
    rows = np.mean([np.mean([0.7, 0.6]), 0.9, 0.4])
    final = np.mean([np.mean([0.8, 0.6]), 0.55, 0.5])
    assert got["diet"]["rows"] == pytest.approx(rows)
    assert got["diet"]["final"] == pytest.approx(final)
    assert got["diet"]["finetune"] == pytest.approx(final - rows)
    assert got["diet"]["candidates_x_runs"] == 3
    # Candidate a over the runs: rows (0.65 + 0.4) / 2 = 0.525 < b's 0.9, final (0.7 + 0.5) / 2
    # = 0.6 > b's 0.55; Full Data puts a (0.99) above b (0.5): the rows rank the two wrongly,
    # the final models rightly.
    assert got["diet"]["rows_kendall"] == pytest.approx(-1.0)
    assert got["diet"]["final_kendall"] == pytest.approx(1.0)
    one = fidelity.phase_split([{"diet/a": run1["diet/a"], "full_data/a": run1["full_data/a"]}])
    assert np.isnan(one["diet"]["rows_kendall"])  # one common candidate: undefined


def test_fidelity_check_pools_a_variant_replicate_filled_from_its_base(tiny_run, tmp_path):
    """experiments/fidelity_check.py --replicates with --replicate_fill_from: a replicate that
    reran some methods only takes the entries it lacks from its base run, and every entry then
    pools both runs' seeds; a count mismatch is a clear error."""
    import copy
    import json
    import subprocess
    import sys

    from diet_jax import results as results_lib

    workdir, _ = tiny_run
    res = results_lib.read(os.path.join(workdir, "results.json"))

    def reseeded(keep):  # the same run as if made with config.seed = 1 (seed 0 -> 1)
        out = copy.deepcopy(res)
        out["results"] = [r for r in out["results"] if keep(r["method"])]
        for r in out["results"]:
            for p in r.get("per_seed", []):
                p["seed"] = 1
            if "seeds" in r:
                r["seeds"] = [1]
        return out

    base, variant = tmp_path / "base", tmp_path / "variant"
    results_lib.save(str(base), reseeded(lambda m: True))
    results_lib.save(str(variant), reseeded(lambda m: m in ("random", "diet")))
    script = os.path.join(ROOT, "experiments", "fidelity_check.py")
    out = tmp_path / "card.json"
    cmd = [sys.executable, script, f"--workdir={workdir}", f"--replicates={variant}"]
    done = subprocess.run(
        [*cmd, f"--replicate_fill_from={base}", f"--json_out={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads(out.read_text())
    assert card["seeds"] == [2]  # every entry: seed 0 from the run, seed 1 from the replicate
    assert {"full_data", "random", "diet", "kmeans"} <= set(card["pool"])  # filled from base
    # Cold Start has no historical phase: no ratio, printed as "-", not "nanx".
    assert "nanx" not in done.stdout and "| cold_start |" in done.stdout
    bad = subprocess.run(
        [*cmd, f"--replicate_fill_from={base},{base}"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode != 0 and "2 entries for 1 replicates" in bad.stderr


def test_table4_pool_rows_read_the_base_and_refuse_the_base_itself(tiny_run, tmp_path):
    """experiments/table4.py --base: a row's four digits (MF, TS, MS, P2; three = phase 2 on)
    are checked before anything runs; a row equal to the base run's own components (read from
    its config.json, phase 2 on in `:tiny`) is refused, as is a malformed code; a base run
    from before `distill.refine` counts as refined."""
    import json
    import subprocess
    import sys

    workdir, _ = tiny_run
    script = os.path.join(ROOT, "experiments", "table4.py")

    def run(base, codes):
        cmd = [sys.executable, script, f"--base={base}", f"--root={tmp_path / 'r'}"]
        return subprocess.run(
            [*cmd, f"--pool_variants={codes}"], capture_output=True, text=True, cwd=ROOT
        )

    for codes in ("111", "1111", "0110,1111"):
        done = run(workdir, codes)
        assert done.returncode != 0 and "is the base run itself" in done.stderr, done.stderr[-800:]
    done = run(workdir, "11x1")
    assert done.returncode != 0 and "not three or four 0/1 digits" in done.stderr
    # Without phase 2 the base is "1--0": 1110, 1000 and 1010 all name it (TS, MS moot).
    cfg = json.loads(open(os.path.join(workdir, "config.json")).read())
    cfg["distill"]["refine"] = False
    norefine = tmp_path / "norefine"
    norefine.mkdir()
    (norefine / "config.json").write_text(json.dumps(cfg))
    for codes in ("1110", "1000", "1010"):
        done = run(norefine, codes)
        assert done.returncode != 0 and "is the base run itself" in done.stderr
    del cfg["distill"]["refine"]  # a run from before the key: phase 2 ran
    (norefine / "config.json").write_text(json.dumps(cfg))
    done = run(norefine, "111")
    assert done.returncode != 0 and "is the base run itself" in done.stderr
