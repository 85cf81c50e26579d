"""The candidate pool, seed aggregation, bootstrap intervals, LR selection, vmapped groups."""

import copy

import jax
import numpy as np
import pytest

from diet_jax import results as results_lib
from diet_jax.evaluate import fidelity, pool, protocol
from diet_jax.train import group


# ---------------------------------------------------------------- pool config
def test_pool_parses_overrides_and_builds_named_candidates(tiny_config):
    cand = pool.parse("dcn_deep:dcn:dcn.hidden=(32,16,8):num_cross_layers=1")
    assert cand == pool.Candidate(
        "dcn_deep", "dcn", (("hidden", (32, 16, 8)), ("num_cross_layers", 1))
    )
    assert not cand.is_base and pool.parse("dcn:dcn").is_base
    cfg = pool.model_config(tiny_config.model, cand)
    assert cfg.dcn.hidden == (32, 16, 8) and cfg.dcn.num_cross_layers == 1
    assert tiny_config.model.dcn.hidden == (32, 16)  # the config itself is untouched
    from diet_jax.data.store import FeatureMap

    fmap = FeatureMap("t", ("a", "b"), (5, 7), ("click",), ())
    model = pool.build(cand, tiny_config, fmap)
    assert model.name == "dcn_deep" and model.dense_net.backbone.hidden == (32, 16, 8)
    assert [c.name for c in pool.candidates(tiny_config)] == ["dcn", "dcn_narrow", "wukong"]
    tiny_config.evaluate.models = ("wukong", "dcn")  # a selection by name, in pool order
    assert [c.name for c in pool.candidates(tiny_config)] == ["dcn", "wukong"]


def test_dense_params_counts_each_candidates_dense_network(tiny_config):
    """pool.dense_params (rank_by_candidate.py's sizes) equals the leaves of each candidate's
    real dense init; a narrower candidate of one backbone is smaller."""
    import jax
    import numpy as np

    from diet_jax.data.store import FeatureMap

    fmap = FeatureMap("t", ("a", "b"), (5, 7), ("click",), ())
    counts = pool.dense_params(tiny_config, fmap)
    assert list(counts) == ["dcn", "dcn_narrow", "wukong"]
    for cand in pool.candidates(tiny_config):
        dense, _ = pool.build(cand, tiny_config, fmap).init_dense(jax.random.key(0))
        assert counts[cand.name] == sum(int(np.size(x)) for x in jax.tree.leaves(dense))
    assert counts["dcn_narrow"] < counts["dcn"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("x:resnet", "unknown backbone 'resnet'"),
        ("x:dcn:hiden=(4,)", "unknown key 'hiden' of model.dcn"),
        ("x:dcn:hidden=True", "hidden=True must be of the type"),
        ("x:dcn:num_cross_layers=(1,)", "num_cross_layers"),
        ("x:dcn:hidden", "must read key=value"),
        ("x:dcn:hidden=(4,", "not a Python literal"),
        ("nobackbone", "must read 'name:backbone"),
    ],
)
def test_pool_check_rejects_bad_candidates(tiny_config, spec, match):
    tiny_config.evaluate.candidates = ("dcn:dcn", spec)
    with pytest.raises(ValueError, match="config.evaluate.candidates") as err:
        pool.check(tiny_config)
    assert match in str(err.value)


def test_pool_check_rejects_repeats_bad_models_seeds_and_grid(tiny_config):
    pool.check(tiny_config)  # the shipped pool is valid
    for key, value, match in [
        ("candidates", ("a:dcn", "a:wukong"), "repeats"),
        ("models", ("dcn", "resnet"), "unknown candidate"),
        ("seeds", 0, "evaluate.seeds"),
        ("lr_grid", (1e-3, -1.0), "lr_grid"),
        ("reference_lr_grid", (0.0,), "reference_lr_grid"),
        ("finetune_lr", "chosen", "finetune_lr"),
        ("finetune_lr", "-1e-3", "finetune_lr"),
        ("finetune_adam", "warm", "finetune_adam"),
        ("lr_select", "best", "lr_select must be one of"),
        ("lr_select_top", -1, "lr_select_top must be an integer >= 0"),
    ]:
        cfg = tiny_config.copy_and_resolve_references()
        cfg.evaluate[key] = value
        with pytest.raises(ValueError, match=match):
            pool.check(cfg)


def test_finetune_rate_is_train_rows_or_a_number(tiny_config):
    """evaluate.finetune_lr: "train" = train.learning_rate, "rows" = the rows' chosen rate, or a
    rate given as a number or as the string a command-line override of the key makes."""
    from diet_jax.evaluate import protocol

    cfg = tiny_config.copy_and_resolve_references()
    assert protocol.finetune_rate("train", 0.02, cfg) == cfg.train.learning_rate
    assert protocol.finetune_rate("rows", 0.02, cfg) == 0.02
    assert protocol.finetune_rate("3e-4", 0.02, cfg) == 3e-4
    assert protocol.finetune_rate(1e-3, 0.02, cfg) == 1e-3
    cfg.evaluate.finetune_lr = "3e-4"
    pool.check(cfg)  # a rate is a valid setting


def test_default_pool_is_valid_and_covers_every_backbone_three_times():
    from tests.conftest import load_config

    config = load_config("synthetic", None)
    pool.check(config)
    cands = pool.candidates(config)
    assert len(cands) >= 15
    counts = {b: sum(c.backbone == b for c in cands) for b in pool.BACKBONES}
    assert min(counts.values()) >= 3
    assert {c.name for c in cands if c.is_base} == set(pool.BACKBONES)
    assert pool.seeds(config) == [0, 1, 2]


# ---------------------------------------------------------------- seeds and bootstrap
def _seed(seed, auc, logloss, secs):
    return {
        "seed": seed,
        "auc": auc,
        "logloss": logloss,
        "per_task": {"click": {"auc": auc, "logloss": logloss}},
        "train_seconds": secs,
        "train_samples": 100,
        "historical_seconds": secs / 2,
        "finetune_seconds": secs / 2,
    }


def test_seed_entry_means_and_sample_std_by_hand():
    per_seed = [_seed(0, 0.70, 0.5, 1.0), _seed(1, 0.72, 0.4, 2.0), _seed(2, 0.74, 0.3, 3.0)]
    e = results_lib.seed_entry("diet", "dcn_deep", "dcn", per_seed)
    assert e["auc"] == pytest.approx(0.72)
    # sample std: sqrt(((-.02)^2 + 0 + .02^2) / 2) = 0.02
    assert e["auc_std"] == pytest.approx(0.02)
    assert e["logloss"] == pytest.approx(0.4) and e["logloss_std"] == pytest.approx(0.1)
    assert e["train_seconds"] == pytest.approx(2.0) and e["historical_seconds"] == pytest.approx(
        1.0
    )
    assert e["per_task"]["click"]["auc"] == pytest.approx(0.72)
    assert e["seeds"] == [0, 1, 2] and e["backbone"] == "dcn" and e["model"] == "dcn_deep"
    assert e["per_seed"] == per_seed
    one = results_lib.seed_entry("diet", "dcn", "dcn", per_seed[:1])
    assert one["auc"] == pytest.approx(0.70) and one["auc_std"] == 0.0
    assert fidelity.seed_stats([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1, 2, 4], ddof=1)))


def test_merge_replicates_pools_seeds_by_hand_and_rejects_a_repeated_seed():
    def run(seeds, aucs, extra=()):
        rows = [
            results_lib.seed_entry(
                m, "dcn", "dcn", [_seed(s, a, 0.4, 1.0) for s, a in zip(seeds, aucs, strict=True)]
            )
            for m in ("full_data", "diet")
        ]
        rows += [
            results_lib.seed_entry(m, "dcn", "dcn", [_seed(seeds[0], 0.5, 0.4, 1.0)]) for m in extra
        ]
        return {"dataset": "x", "results": rows, "fidelity": {"diet": {"kendall": 1.0}}}

    merged = results_lib.merge_replicates(
        [run([0, 1], [0.70, 0.72], ("random",)), run([10], [0.77])]
    )
    assert merged["fidelity"] == {} and merged["dataset"] == "x"
    # random/dcn is in the first run only: left out
    assert sorted(r["method"] for r in merged["results"]) == ["diet", "full_data"]
    e = merged["results"][0]
    assert e["seeds"] == [0, 1, 10] and e["auc"] == pytest.approx(0.73)
    # sample std of 0.70, 0.72, 0.77: mean 0.73, squares .0009 + .0001 + .0016 = .0026 / 2
    assert e["auc_std"] == pytest.approx(np.sqrt(0.0013))
    with pytest.raises(ValueError, match="repeat"):
        results_lib.merge_replicates([run([0, 1], [0.7, 0.7]), run([1], [0.7])])


def test_bootstrap_interval_from_given_resamples_by_hand():
    # 3 candidates x 2 seeds.
    method = np.array([[0.60, 0.62], [0.70, 0.72], [0.66, 0.64]])
    ref = np.array([[0.80, 0.80], [0.90, 0.90], [0.85, 0.87]])
    z = np.zeros((3, 2), int)
    resamples = [
        # all candidates, seed 0 of each: method 0.60, 0.70, 0.66 vs ref 0.80, 0.90, 0.85 -> tau 1
        (np.array([0, 1, 2]), z, z),
        # candidates 0, 0, 1 with method seeds (0,1),(1,1),(0,0): means .61, .62, .70 vs ref
        # .80, .80, .90: pairs (1,2): ref tie -> tau-b = (2 - 0) / sqrt(3 * 2) = 0.8165
        (np.array([0, 0, 1]), np.array([[0, 1], [1, 1], [0, 0]]), z),
        # candidates 2, 1, 0 with method seed 1 of candidate 2 (0.64) and ref seed 1 (0.87):
        # method .64, .70, .60; ref .87, .90, .80: concordant -> tau 1
        (np.array([2, 1, 0]), np.ones((3, 2), int), np.ones((3, 2), int)),
        # one candidate drawn three times: undefined, dropped
        (np.array([1, 1, 1]), z, z),
    ]
    taus = np.array([1.0, 2 / np.sqrt(6), 1.0])
    lo, hi = fidelity.bootstrap_interval(method, ref, fidelity.kendall, resamples)
    assert lo == pytest.approx(np.percentile(taus, 2.5))
    assert hi == pytest.approx(np.percentile(taus, 97.5))
    # percentile by hand: sorted (0.8165, 1, 1), position 0.05 -> 0.8165 + 0.05 * (1 - 0.8165)
    assert lo == pytest.approx(2 / np.sqrt(6) + 0.05 * (1 - 2 / np.sqrt(6)))
    assert hi == pytest.approx(1.0)


def test_fidelity_table_reports_both_cost_ratios_and_a_seeded_interval():
    def entry(method, model, aucs, hist, total):
        e = results_lib.seed_entry(
            method, model, "dcn", [_seed(s, a, 0.4, total) for s, a in enumerate(aucs)]
        )
        e["historical_seconds"] = hist
        e["historical_epochs"] = 1 if method == "full_data" else 8
        return e

    res = [
        entry("full_data", "a", [0.70, 0.71], 90.0, 100.0),
        entry("full_data", "b", [0.75, 0.74], 90.0, 100.0),
        entry("full_data", "c", [0.80, 0.81], 90.0, 100.0),
        entry("random", "a", [0.60, 0.61], 1.0, 10.0),
        entry("random", "b", [0.65, 0.62], 2.0, 10.0),
        entry("random", "c", [0.70, 0.72], 3.0, 20.0),
    ]
    t = fidelity.fidelity_table(res, bootstrap=200)["random"]
    assert t["cost_ratio_end_to_end"] == pytest.approx(300 / 40) == t["cost_ratio"]
    assert t["cost_ratio_historical"] == pytest.approx(270 / 6)
    # per epoch: full data 90 s per epoch each, random 1/8, 2/8, 3/8 s per epoch
    assert t["cost_ratio_historical_per_epoch"] == pytest.approx(270 / (6 / 8))
    assert t["kendall"] == pytest.approx(1.0)
    lo, hi = t["kendall_ci"]
    assert -1.0 <= lo <= hi <= 1.0 and hi == pytest.approx(1.0)
    assert t["kendall_ci"] == fidelity.fidelity_table(res, bootstrap=200)["random"]["kendall_ci"]


# ---------------------------------------------------------------- learning-rate selection
def test_select_lr_takes_the_argmax_of_best_epoch_validation_auc():
    grid = [1e-4, 1e-3, 1e-2]
    val = np.array([[0.60, 0.65, 0.64], [0.70, 0.66, 0.69], [0.71, np.nan, 0.50]])
    assert protocol.select_lr(grid, val) == 2  # 0.71 at epoch 0 beats 0.70
    val[2, 0] = 0.70
    assert protocol.select_lr(grid, val) == 1  # a tie goes to the earlier rate
    val[:, :] = np.nan
    val[0, 1] = 0.5
    assert protocol.select_lr(grid, val) == 0  # diverged members are never chosen
    with pytest.raises(ValueError, match="grid of 3"):
        protocol.select_lr(grid, val[:2])


# ---------------------------------------------------------------- vmapped group == sequential
@pytest.fixture(scope="module")
def group_setup():
    from diet_jax.data.store import FeatureMap
    from tests.conftest import load_config

    config = load_config("synthetic", "tiny")
    config.evaluate.max_epochs = 2
    config.evaluate.rows_batch_size = 32
    fmap = FeatureMap("t", ("a", "b", "c"), (11, 13, 7), ("click", "buy"), ())
    # DCN + the MMoE head: no parameter with an exactly-zero gradient. (Under Adam such a
    # parameter, e.g. a bias feeding BatchNorm, moves by +-lr on the sign of float noise, so two
    # correct runs differ there by O(lr); WuKong and FinalNet have some.)
    model = pool.build(pool.parse("dcn:dcn"), config, fmap)
    rng = np.random.default_rng(0)
    d = config.model.embed_dim

    def rows(n):
        return {
            "e": rng.normal(0, 0.5, (n, 3, d)).astype(np.float32),
            "logits": rng.normal(-1, 1, (n, 2)).astype(np.float32),
        }

    n_val = 200
    y = (rng.random((n_val, 2)) < 0.3).astype(np.uint8)
    e_val = rng.normal(0, 0.5, (n_val, 3, d)).astype(np.float32)
    val = protocol.ValidationRows(
        jax.numpy.asarray(group.pad_rows(e_val, 128)), y, n_val, 128, ("click", "buy")
    )
    return config, model, rows, val


@pytest.mark.parametrize("shared", [True, False])
def test_vmapped_group_equals_each_member_trained_alone(group_setup, shared):
    config, model, rows, val = group_setup
    base = rows(100)  # 100 rows at batch 32: a padded last batch
    rows_G = [base] * 3 if shared else [base, rows(100), rows(100)]
    seeds, lrs = [0, 1, 2], [1e-3, 1e-2, 3e-3]
    vm = protocol.train_rows_group(model, rows_G, seeds, lrs, val, config, vmapped=True)
    seq = protocol.train_rows_group(model, rows_G, seeds, lrs, val, config, vmapped=False)
    assert isinstance(seq["params"], group.Members) and len(seq["params"]) == 3
    seq_p, seq_s = group.stacked(seq["params"]), group.stacked(seq["state"])
    for a, b in zip(jax.tree.leaves(vm["params"]), jax.tree.leaves(seq_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    for g in range(3):  # a member read back from either form is that member
        for a, b in zip(
            jax.tree.leaves(group.unstack(vm["params"], g)),
            jax.tree.leaves(group.unstack(seq["params"], g)),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(vm["state"]), jax.tree.leaves(seq_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(vm["val_auc"], seq["val_auc"], atol=1e-6)
    np.testing.assert_array_equal(vm["best_epoch"], seq["best_epoch"])
    # Members really differ (different seeds and rates), so the comparison is not vacuous.
    leaf = np.asarray(jax.tree.leaves(vm["params"])[0])
    assert not np.allclose(leaf[0], leaf[1])


@pytest.mark.parametrize("vmapped", [False, True])
def test_a_pruned_grid_keeps_its_best_rates_trajectories_and_stops_the_rest(group_setup, vmapped):
    config, model, rows, val = group_setup
    config = copy.deepcopy(config)
    config.evaluate.max_epochs = 3
    r = rows(100)
    seeds, lrs = [0, 0, 0, 0], [1e-4, 3e-2, 3e-3, 1e-2]
    full = protocol.train_rows_group(model, [r] * 4, seeds, lrs, val, config, vmapped=False)
    cut = protocol.train_rows_group(
        model, [r] * 4, seeds, lrs, val, config, vmapped=vmapped, prune=(1, 2)
    )
    # By hand: after epoch 1 the two rates best by validation AUC so far go on.
    kept = set(np.argsort(-full["val_auc"][:, 0], kind="stable")[:2].tolist())
    assert 0 not in kept  # 1e-4 barely moves in one epoch: the pruning is not vacuous
    for g in range(4):
        if g in kept:  # trains exactly as without pruning
            np.testing.assert_allclose(cut["val_auc"][g], full["val_auc"][g], atol=1e-6)
            assert cut["best_epoch"][g] == full["best_epoch"][g] and cut["epochs"][g] == 3
            for a, b in zip(
                jax.tree.leaves(group.unstack(cut["params"], g)),
                jax.tree.leaves(group.unstack(full["params"], g)),
                strict=True,
            ):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        else:  # stopped after epoch 1, with that epoch as its best
            np.testing.assert_allclose(cut["val_auc"][g, :1], full["val_auc"][g, :1], atol=1e-6)
            assert np.isnan(cut["val_auc"][g, 1:]).all()
            assert cut["best_epoch"][g] == 0 and cut["epochs"][g] == 1
            assert np.isnan(cut["losses"][g, 1:]).all()  # no epoch after the prune counted
    if not vmapped:  # each member's own clock, which together make the group's
        np.testing.assert_allclose(cut["seconds_G"].sum(), cut["seconds"])
        assert (cut["seconds_G"] > 0).all()
    with pytest.raises(ValueError, match="shared by its members"):
        protocol.train_rows_group(
            model, [r, rows(100)], [0, 1], [1e-3, 1e-2], val, config, prune=(1, 1)
        )


@pytest.mark.parametrize("vmapped", [False, True])
def test_lazy_rows_train_like_loaded_ones_one_member_at_a_time(group_setup, vmapped, monkeypatch):
    """LazyRows members give the same group as their loaded rows; a sequential group reads each
    member's rows when that member trains (after the previous member's epochs; a vmapped group
    needs them all before its first epoch) and keeps none of them; members sharing one LazyRows
    read it once."""
    import gc
    import weakref

    config, model, rows, val = group_setup
    made = [rows(64) for _ in range(3)]
    scored = [0]  # validation passes so far: one per member and epoch when sequential
    real_val_auc = protocol._val_auc

    def counting_val_auc(*args):
        scored[0] += 1
        return real_val_auc(*args)

    monkeypatch.setattr(protocol, "_val_auc", counting_val_auc)
    loads, scored_at_load = [], []

    def loader(g):
        def load():
            scored_at_load.append(scored[0])
            out = {k: v.copy() for k, v in made[g].items()}
            loads.append(weakref.ref(out["e"]))
            return out

        return protocol.LazyRows(64, load)

    seeds, lrs = [0, 1, 2], [1e-3, 1e-2, 3e-3]
    lazy = protocol.train_rows_group(
        model, [loader(g) for g in range(3)], seeds, lrs, val, config, vmapped=vmapped
    )
    epochs = config.evaluate.max_epochs
    assert scored_at_load == ([0, 0, 0] if vmapped else [0, epochs, 2 * epochs])
    gc.collect()
    assert all(r() is None for r in loads)  # no loaded rows outlive the group
    eager = protocol.train_rows_group(model, made, seeds, lrs, val, config, vmapped=vmapped)
    lazy_p, eager_p = group.stacked(lazy["params"]), group.stacked(eager["params"])
    for a, b in zip(jax.tree.leaves(lazy_p), jax.tree.leaves(eager_p), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(lazy["val_auc"], eager["val_auc"])
    assert lazy["rows"] == 64 and len(loads) == 3
    one = loader(0)
    loads.clear()
    protocol.train_rows_group(model, [one] * 2, [0, 1], [1e-3, 1e-2], val, config)
    assert len(loads) == 1
    with pytest.raises(ValueError, match="Member 1 has 64 rows; member 0 has 50"):
        protocol.train_rows_group(
            model,
            [protocol.LazyRows(50, lambda: rows(50)), loader(1)],
            [0, 1],
            [1e-3] * 2,
            val,
            config,
            vmapped=False,
        )


def test_padding_rows_changes_nothing(group_setup):
    config, model, rows, val = group_setup
    r = rows(64)
    a = protocol.train_rows_group(model, [r, r], [0, 1], [1e-3, 1e-2], val, config)
    b = protocol.train_rows_group(model, [r, r], [0, 1], [1e-3, 1e-2], val, config, pad_to=130)
    a_p, b_p = group.stacked(a["params"]), group.stacked(b["params"])
    for x, y in zip(jax.tree.leaves(a_p), jax.tree.leaves(b_p), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["val_auc"], b["val_auc"], atol=1e-6)


def test_one_sequential_epoch_function_per_architecture(group_setup):
    """Without a member axis shared and per-member rows are the same program: one jitted
    function (one compilation per architecture), where a group keeps two."""
    _, model, _, _ = group_setup
    seq = [group.make_group_fns(model, 32, 10.0, shared, False) for shared in (True, False)]
    assert seq[0] is seq[1]
    vm = [group.make_group_fns(model, 32, 10.0, shared, True) for shared in (True, False)]
    assert vm[0] is not vm[1]
