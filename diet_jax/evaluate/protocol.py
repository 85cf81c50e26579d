"""The candidate protocol (warm-up style, the paper's section 4.2.2) and the data-free methods.

Reduced-data methods (random, el2n, kmeans, diet): a candidate inherits the final teacher's
embedding table; its dense network, freshly initialised, trains on the (embedding, soft label)
rows for up to `evaluate.max_epochs` epochs with Adam, keeping the epoch whose full model has the
best AUC on the real validation day; the learning rate is chosen from `evaluate.lr_grid` on that
validation AUC (paper 5.1.4; the grid pruned to its best rates after its first epochs,
`evaluate.lr_prune_epochs`), on the first seed (`evaluate.lr_select = "final"`, the default: on
the validation AUC of the model after the fine-tune, for the `evaluate.lr_select_top` rates whose
rows epochs score best; "rows": on the best rows epoch's); then the whole model is fine-tuned one
epoch on the subsequent block and evaluated on the test day. The rows epochs of a learning-rate
grid, or of the seeds at the chosen rate, run as one vmapped group (`train/group.py`).

Reference methods: full_data (from scratch, one epoch over every historical stage and the
subsequent block, in time order), cold_start (from scratch, subsequent block only),
warmup_start (teacher embeddings + fresh dense network, subsequent block only), warm_full_data
(teacher embeddings + fresh dense network, every historical stage and the subsequent block:
Full Data with the table every reduced method inherits), all at train.learning_rate.

Timing is training only, for every method alike: compilation and a first call of every jitted
function run untimed before its timed calls, and validation passes are outside the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diet_jax import metrics, parallel
from diet_jax.data import loader
from diet_jax.data.store import StageStore
from diet_jax.models.factory import RecModel
from diet_jax.models.layers import BN_MOMENTUM
from diet_jax.train import group, loop, optim
from diet_jax.train.steps import make_batch_stats_step, make_predict_step, make_trainer


@dataclasses.dataclass
class CandidateResult:
    metrics: dict  # test metrics of the final model
    train_seconds: float  # training only: rows epochs + fine-tune (validation passes excluded)
    train_samples: int
    info: dict  # best epoch, validation AUC per epoch, chosen learning rate, seconds by phase


# ---------------------------------------------------------------------------- training clock
# Every method's training is timed the same way: each jitted function is compiled and run once
# untimed before its first timed call, and the clock counts compilations that happen inside a
# timed region (`info["timed_compiles"]`), which must stay 0 for every method.
_COMPILES = [0]


def _on_jax_event(event: str, *args, **kwargs) -> None:
    if event.startswith(("/jax/core/compile", "/jax/compilation_cache")):
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


class TrainClock:
    """Accumulates seconds of timed regions and the compilations that fell inside them."""

    def __init__(self):
        self.seconds, self.compiles = 0.0, 0

    @contextlib.contextmanager
    def timed(self):
        c0, t0 = _COMPILES[0], time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0
        self.compiles += _COMPILES[0] - c0


_WARM_SIGNATURES: set = set()


def _warm_call(fn, *args) -> None:
    """Runs fn(*args) once untimed the first time it meets these shapes (compile + first run)."""
    sig = (id(fn), tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args)))
    if sig in _WARM_SIGNATURES:
        return
    jax.block_until_ready(fn(*args))  # the functions warmed here never donate their inputs
    _WARM_SIGNATURES.add(sig)


# ---------------------------------------------------------------------------- validation rows
@dataclasses.dataclass
class ValidationRows:
    """The validation day in embedding space under the inherited (teacher's) table."""

    e_VxFxD: jax.Array  # padded to a multiple of `chunk`
    y_NxK: np.ndarray
    n: int
    chunk: int
    tasks: tuple


def validation_rows(model: RecModel, params_embed: dict, store: StageStore, config):
    """The validation day's embeddings (a seeded subsample of evaluate.val_rows rows if > 0)."""
    stage = store.stages("validation")[0]
    idx = np.arange(len(stage))
    k = int(config.evaluate.val_rows)
    if 0 < k < len(stage):
        idx = np.sort(np.random.default_rng(config.seed).choice(len(stage), k, replace=False))
    x, y = np.asarray(stage.x_NxF)[idx], np.asarray(stage.y_NxK)[idx]
    bs = int(config.train.eval_batch_size)
    embed = jax.jit(model.embed)
    e = np.concatenate(
        [np.asarray(embed(params_embed, x[i : i + bs])) for i in range(0, len(x), bs)]
    )
    chunk = min(4096, len(x))
    return ValidationRows(
        jnp.asarray(group.pad_rows(e, chunk)), y, len(x), chunk, tuple(store.feature_map.tasks)
    )


# ---------------------------------------------------------------------------- initialisation
# One candidate initialises the same seeds many times (the LR grid shares the first seed; every
# reduced method re-inits every seed); flax's init runs op by op (~0.2 s at reference size), so
# the last model's inits are kept. Nothing that receives them donates its inputs.
_INITS: dict = {}


def _cached_init(kind: str, model: RecModel, seed: int):
    if any(k[1] != model for k in _INITS):
        _INITS.clear()
    key = (kind, model, int(seed))
    if key not in _INITS:
        init = model.init_dense if kind == "dense" else model.init
        _INITS[key] = init(jax.random.key(int(seed)))
    return _INITS[key]


def init_dense(model: RecModel, seed: int):
    """model.init_dense(jax.random.key(seed)), memoised for the current model."""
    return _cached_init("dense", model, seed)


def init_full(model: RecModel, seed: int):
    """model.init(jax.random.key(seed)), memoised for the current model."""
    return _cached_init("full", model, seed)


# ---------------------------------------------------------------------------- reduced rows
@dataclasses.dataclass(frozen=True, eq=False)
class LazyRows:
    """`n` rows {"e", "logits"} that `load()` reads when a member trains: a sequential group then
    holds one member's rows at a time (a selection's saved draws, one per seed, grow with the
    stream). Members given the same LazyRows object share one load."""

    n: int
    load: Callable[[], dict]


def rows_count(rows) -> int:
    """The number of rows of a {"e", "logits"} dict or a LazyRows (read without loading)."""
    return rows.n if isinstance(rows, LazyRows) else int(rows["e"].shape[0])  # no host copy


def _loaded(rows) -> dict:
    return rows.load() if isinstance(rows, LazyRows) else rows


def train_rows_group(
    model: RecModel,
    rows_G: list,
    seeds_G: list[int],
    lrs_G: list[float],
    val: ValidationRows,
    config,
    vmapped: bool | None = None,
    pad_to: int = 0,
    prune: tuple[int, int] = (0, 0),
) -> dict:
    """Trains G fresh dense networks on rows for evaluate.max_epochs epochs as one vmapped group.

    Member g starts from init_dense(key(seeds_G[g])), shuffles with default_rng(seeds_G[g]) and
    uses Adam at lrs_G[g] on rows_G[g] (one shared array when every member has the same rows),
    a {"e", "logits"} dict or a `LazyRows` (read when its member trains: a sequential group holds
    one member's rows at a time).
    After every epoch the whole group is scored on the validation rows and each member keeps its
    best epoch. `vmapped=False` trains the members one after another (the reference); None
    follows evaluate.group_mode.
    `pad_to`: rows padded to this many (never drawn; their batches are no-ops), so that methods
    with different row counts share one compiled epoch.
    `prune` = (k, keep), k > 0 (a learning-rate grid, `evaluate.lr_prune_epochs` /
    `lr_prune_keep`): after k epochs only the `keep` members best by validation AUC so far go
    on; the others stop with their best of those k epochs (their later AUCs are NaN). A member
    that goes on trains exactly as without pruning. Sequential members that stop cost nothing
    more; a vmapped group keeps computing them (on an accelerator the group costs about one
    member) but scores them no more, so both modes keep the same models.
    Returns {"params", "state", "opt" (Adam's state, best epochs; stacked when vmapped, else
    `group.Members`: `group.unstack` reads either), "val_auc" [G, E],
    "best_epoch" [G],
    "seconds" (training only, the whole group), "samples" (per member), "compiles"}.
    """
    ev = config.evaluate
    if vmapped is None:
        vmapped = group_vmapped(config)
    g_count = len(seeds_G)
    shared = all(r is rows_G[0] for r in rows_G)
    n = rows_count(rows_G[0])
    n_pad = max(n, int(pad_to))
    bs = min(int(ev.rows_batch_size), n_pad)
    fns = group.make_group_fns(
        model, bs, float(config.train.max_grad_norm), shared, vmapped, val.chunk
    )
    inits = [init_dense(model, s) for s in seeds_G]
    params = [p for p, _ in inits]
    states = [s for _, s in inits]
    opts = [fns.init_opt(p) for p in params]
    lrs = [jnp.asarray(lr, jnp.float32) for lr in lrs_G]
    rngs = [np.random.default_rng(s) for s in seeds_G]

    def padded(r, key):
        """One member's rows padded to n_pad: one copy when padding, none otherwise (the rows
        grow with the stream). Through a host view, so the result is an uncommitted array
        whatever the rows were (a committed one would recompile the steps inside the clock);
        on the CPU `device_put` of an aligned float32 view aliases it."""
        a = r[key]
        if n_pad > n:
            a = jnp.pad(jnp.asarray(a, jnp.float32), [(0, n_pad - n)] + [(0, 0)] * (a.ndim - 1))
        return jax.device_put(np.asarray(a, np.float32))

    def as_rows():
        if shared:
            r = _loaded(rows_G[0])
            return padded(r, "e"), padded(r, "logits")
        if not vmapped:  # members one at a time: each member's rows when it trains
            return None, None
        loaded = [_loaded(r) for r in rows_G]
        return tuple(jnp.stack([padded(r, key) for r in loaded]) for key in ("e", "logits"))

    e, logits = as_rows()
    clock = TrainClock()
    max_epochs = int(ev.max_epochs)
    aucs = np.full((g_count, max_epochs), np.nan)
    losses = np.full((g_count, max_epochs), np.nan)
    prune_at, keep = int(prune[0]), int(prune[1])
    if not 0 < prune_at < max_epochs or not 0 < keep < g_count:
        prune_at = max_epochs  # no pruning: every member trains every epoch
    elif not shared:
        raise ValueError("Pruning a group needs rows shared by its members (a rate grid).")
    epochs_G = np.full(g_count, max_epochs)  # epochs each member trains
    seconds_G = np.zeros(g_count)  # its training seconds (vmapped: its share of the group's)

    def pruned_at(epoch: int) -> np.ndarray:
        """[G] bool: the members that stop after `epoch` (the prune point's losers)."""
        if epoch + 1 != prune_at:
            return np.zeros(g_count, bool)
        so_far = np.max(np.where(np.isnan(aucs[:, :prune_at]), -np.inf, aucs[:, :prune_at]), 1)
        losers = np.ones(g_count, bool)
        losers[rates_by_rows_auc(so_far)[:keep]] = False
        return losers

    if vmapped:
        p, s, o, lr = group.stack(params), group.stack(states), group.stack(opts), jnp.stack(lrs)
        best = None
        live_G = np.ones(g_count, bool)
        for epoch in range(max_epochs):
            order = jnp.asarray(np.stack([group.padded_order(n, bs, r, n_pad) for r in rngs]))
            _warm_call(fns.epoch, p, s, o, lr, e, logits, order)
            with clock.timed():
                p, s, o, loss_G = jax.block_until_ready(fns.epoch(p, s, o, lr, e, logits, order))
            losses[live_G, epoch] = np.asarray(loss_G)[live_G]
            out_GxVxK = np.asarray(fns.predict(p, s, val.e_VxFxD))[:, : val.n]
            for g in np.flatnonzero(live_G):
                aucs[g, epoch] = _val_auc(val, out_GxVxK[g])
            if best is None:
                best = (p, s, o)
            else:
                improved = live_G & (
                    aucs[:, epoch]
                    > np.nanmax(
                        np.where(np.isnan(aucs[:, :epoch]), -np.inf, aucs[:, :epoch]), axis=1
                    )
                )
                best = fns.keep(best, (p, s, o), jnp.asarray(improved))
            stop = pruned_at(epoch)
            epochs_G[stop] = epoch + 1
            live_G &= ~stop
        best_p, best_s, best_o = best
        seconds_G[:] = clock.seconds / g_count
    else:
        # Members one after another, in rounds: every member up to the prune point, then the
        # members that go on (one round without pruning). A member's state waits between rounds.
        live = {g: (params[g], states[g], opts[g], None) for g in range(g_count)}
        best_G = [None] * g_count
        for first, last in ((0, prune_at), (prune_at, max_epochs)):
            for g in sorted(live):
                p, s, o, best = live[g]
                if shared:
                    eg, lg = e, logits
                else:  # this member's rows only (read now when lazy), dropped after it trains
                    r = _loaded(rows_G[g])
                    if rows_count(r) != n:
                        raise ValueError(f"Member {g} has {rows_count(r)} rows; member 0 has {n}.")
                    eg, lg = padded(r, "e"), padded(r, "logits")
                    del r
                before = clock.seconds
                for epoch in range(first, last):
                    order = jnp.asarray(group.padded_order(n, bs, rngs[g], n_pad))
                    _warm_call(fns.epoch, p, s, o, lrs[g], eg, lg, order)
                    with clock.timed():
                        p, s, o, loss = jax.block_until_ready(
                            fns.epoch(p, s, o, lrs[g], eg, lg, order)
                        )
                    losses[g, epoch] = float(loss)
                    out = np.asarray(fns.predict(p, s, val.e_VxFxD))[: val.n]
                    aucs[g, epoch] = _val_auc(val, out)
                    prev = aucs[g, :epoch]
                    if best is None or aucs[g, epoch] > np.nanmax(
                        np.where(np.isnan(prev), -np.inf, prev)
                    ):
                        best = (p, s, o)
                seconds_G[g] += clock.seconds - before
                # Only a member that goes on keeps its latest state besides its best.
                live[g], best_G[g] = ((p, s, o, best) if last < max_epochs else None), best
                eg = lg = None  # this member's rows go before the next member's are read
            if last < max_epochs:
                for g in np.flatnonzero(pruned_at(last - 1)):
                    del live[g]
                    epochs_G[g] = last
            else:
                break
        best_p, best_s, best_o = (group.Members([k[i] for k in best_G]) for i in range(3))
    if not np.isfinite(losses).any():
        raise FloatingPointError(
            f"{model.name}: the loss on rows is {losses[:, 0]} for every member."
        )
    aucs = np.where(np.isfinite(losses), aucs, np.nan)  # a diverged member is never selected
    return {
        "params": best_p,
        "state": best_s,
        "opt": best_o,
        "val_auc": aucs,
        "best_epoch": _best_epochs(aucs),
        "seconds": clock.seconds,
        "compiles": clock.compiles,
        "samples": max_epochs * n,
        "epochs": epochs_G,
        "seconds_G": seconds_G,
        "rows": n,
        "losses": losses,
    }


def group_vmapped(config) -> bool:
    """evaluate.group_mode: "vmap", "sequential", or "auto" (vmap on an accelerator; members one
    after another on the CPU, where the vmapped group measured slower: docs/evaluation.md)."""
    mode = config.evaluate.get("group_mode", "auto")
    if mode not in ("auto", "vmap", "sequential"):
        raise ValueError(
            f"config.evaluate.group_mode must be auto, vmap or sequential, got {mode!r}."
        )
    if mode == "auto":
        return jax.devices()[0].platform != "cpu"
    return mode == "vmap"


def _val_auc(val: ValidationRows, logits_NxK: np.ndarray) -> float:
    return metrics.multitask_metrics(val.y_NxK, logits_NxK, list(val.tasks))["auc"]


def _best_epochs(aucs_GxE: np.ndarray) -> np.ndarray:
    return np.argmax(np.where(np.isnan(aucs_GxE), -np.inf, aucs_GxE), axis=1)


def select_lr(grid, val_auc_GxE: np.ndarray) -> int:
    """Index of the grid's learning rate whose best epoch has the highest validation AUC.

    Ties go to the earlier entry; a member whose AUC is NaN (diverged) is never chosen unless all
    are.
    """
    a = np.asarray(val_auc_GxE, np.float64)
    if a.shape[0] != len(grid):
        raise ValueError(f"{a.shape[0]} validation rows for a grid of {len(grid)} rates.")
    best = np.max(np.where(np.isnan(a), -np.inf, a), axis=1)
    return int(np.argmax(best))


def rates_by_rows_auc(rows_auc_G) -> list[int]:
    """Grid indices from the best rows AUC down (ties: the earlier rate first), the order in
    which evaluate.lr_select_top keeps rates."""
    return [int(g) for g in np.argsort(-np.asarray(rows_auc_G, np.float64), kind="stable")]


def train_on_rows(
    model: RecModel, params_embed: dict, rows: dict, store: StageStore, config, seed: int
):
    """Trains a fresh dense network on rows {"e": [N,F,D], "logits": [N,K]} under fixed embeddings,
    at evaluate.learning_rate (no grid). Returns (params_dense, state, info, seconds, samples) of
    the epoch with the best validation AUC of the full model.
    """
    val = validation_rows(model, params_embed, store, config)
    out = train_rows_group(
        model, [rows], [seed], [float(config.evaluate.learning_rate)], val, config, vmapped=False
    )
    info = {
        "best_epoch": int(out["best_epoch"][0]),
        "val_auc_per_epoch": out["val_auc"][0].tolist(),
        "rows": out["rows"],
        "rows_seconds": out["seconds"],
    }
    p, s = group.unstack(out["params"], 0), group.unstack(out["state"], 0)
    return p, s, info, out["seconds"], out["samples"]


# Jitted functions are built once per model (and per hyperparameters) for the whole run, so a
# candidate trained under seven methods compiles its steps once, not seven times.
@functools.cache
def _predict_step(model: RecModel):
    return make_predict_step(model)


@functools.cache
def _batch_stats_step(model: RecModel):
    return make_batch_stats_step(model, BN_MOMENTUM)


_TRAINERS: dict = {}


def _trainer(model: RecModel, train_cfg):
    """One trainer per model and train config, whatever its learning rate: the rate is set in
    the state (`optim.set_learning_rate`), so Full Data at train.learning_rate and a reduced
    method's fine-tune at evaluate.finetune_lr share one compiled step (one compilation of the
    whole model's step per candidate, not one per rate)."""
    cfg = train_cfg.to_dict()
    cfg.pop("learning_rate", None)
    key = (model, json.dumps(cfg, sort_keys=True, default=str))
    if key not in _TRAINERS:
        # The configured embedding optimizer; the rate given here is the state's initial one.
        _TRAINERS[key] = make_trainer(model, train_cfg, runtime_lr=True)
    return _TRAINERS[key]


def _copy(tree):
    """A fresh buffer for every leaf: the fine-tune step donates its state."""
    return jax.tree.map(jnp.copy, tree)


_WARM: set = set()


def _warm_up(trainer, train_state, stage, batch_size: int, sharding=None) -> None:
    """Compiles the train step outside the timed epochs: one step on a throwaway copy."""
    if id(trainer) in _WARM:
        return
    batch = next(iter(loader.device_batches(stage, batch_size, shuffle=False, sharding=sharding)))
    # Two steps: a step's output state may be placed differently from the state it was given
    # (committed), and the second step compiles for that signature.
    state, _ = trainer.step(_copy(train_state), batch)
    jax.block_until_ready(trainer.step(state, batch))
    _WARM.add(id(trainer))


def inherited_embed_opt(teacher, config):
    """The teacher's row-optimizer state of its table, for candidates that inherit the table
    (`evaluate.inherit_optimizer`), or None (a fresh one).

    A fresh row-wise Adagrad on a trained table makes the fine-tune's first steps its largest
    (lr x sign(g) per coordinate, about a third of the embeddings' std at lr 0.03) on every row
    the subsequent block touches; the teacher's own stages inherit their accumulators, and so
    does a candidate that continues the teacher's table (docs/evaluation.md, "Inheriting the
    table's optimizer state"). With `train.embedding_optimizer = "dense_adam"` there is no
    separate table state to hand over: the moments start fresh, and a warning says so.
    """
    if not config.evaluate.get("inherit_optimizer", True):
        return None
    opt = getattr(teacher, "opt_state", None)
    if not isinstance(opt, dict) or "embed" not in opt:
        logging.warning(
            "evaluate.inherit_optimizer: the teacher's optimizer (%s) keeps no separate state "
            "for its table; candidates fine-tune the inherited table with fresh moments.",
            config.train.get("embedding_optimizer", "dense_adam"),
        )
        return None
    return opt["embed"]


def finetune_and_test(
    model: RecModel,
    params: dict,
    state: dict,
    store: StageStore,
    config,
    seed: int,
    stages,
    timings: dict | None = None,
    embed_opt=None,
    dense_adam=None,
    score_test: bool = True,
):
    """One epoch per stage in `stages` (names, in order) on the whole model, then test metrics.

    With evaluate.precise_bn the BatchNorm statistics of the final model are re-estimated on the
    last stage's batches before it is scored (`loop.precise_batch_stats`; every method alike).
    `timings`, if given, receives {"stage_seconds": {name: s}, "timed_compiles": n,
    "validation": metrics of the final model on the validation day, "precise_bn_seconds": s}.
    `embed_opt`: the row-optimizer state the table's updates continue from (the teacher's,
    `inherited_embed_opt`); None = a fresh one. `dense_adam`: an optax.ScaleByAdamState of the
    dense parameters (the rows phase's, at its best epoch) that the dense network's Adam
    continues from; None = fresh moments. `score_test=False`: the first value returned is
    instead a function that scores the test day, so that a rate tried and not chosen is never
    tested.
    """
    trainer = _trainer(model, config.train)
    train_state = trainer.init(_copy(params), _copy(state))
    # The trainer is shared by every rate: this run's is set in its state.
    lr = float(config.train.learning_rate)
    train_state = train_state.replace(opt_state=optim.set_learning_rate(train_state.opt_state, lr))
    if embed_opt is not None:
        if _layout(train_state.opt_state["embed"]) != _layout(embed_opt):
            raise ValueError(
                f"{model.name}: the inherited table optimizer state does not match the "
                "candidate's (another train.embedding_optimizer or table?)."
            )
        train_state = train_state.replace(
            opt_state={**train_state.opt_state, "embed": _copy(embed_opt)}
        )
    if dense_adam is not None:
        train_state = train_state.replace(
            opt_state=_continue_adam(train_state.opt_state, _copy(dense_adam), model.name)
        )
    mesh = parallel.mesh_from_config(config)  # scale-out: as the teacher (train/reference.py)
    if mesh is not None:
        shard = config.parallel.shard_embeddings
        shardings = parallel.state_shardings(train_state, mesh, shard_embeddings=shard)
        train_state = parallel.put(train_state, shardings)
    else:
        # Every leaf committed to one device, whatever made it (a restored teacher table, a
        # fresh init, a group's output): one compiled step, warmed once, serves every method.
        train_state = jax.device_put(train_state, jax.local_devices()[0])
    rows = parallel.batch_sharding(mesh)
    step = trainer.step
    _warm_up(trainer, train_state, store.stage(stages[0]), config.train.batch_size, rows)
    seconds, samples, per_stage, compiles = 0.0, 0, {}, 0
    for i, name in enumerate(stages):
        c0 = _COMPILES[0]
        train_state, stats = loop.train_epoch(
            step,
            train_state,
            store.stage(name),
            batch_size=config.train.batch_size,
            seed=seed,
            epoch=100 + i,
            desc=f"{model.name} {name}",
            progress=config.progress,
            log_every=config.train.log_every,
            sharding=rows,
        )
        compiles += _COMPILES[0] - c0  # over the whole call: a superset of its timed region
        seconds += stats["seconds"]
        samples += stats["samples"]
        per_stage[name] = stats["seconds"]
    bn_start = time.perf_counter()
    if config.evaluate.precise_bn:  # a no-op for models without BatchNorm
        # Outside the training clock, like validation: one forward pass over the stage, the
        # same for every method.
        new_state = loop.precise_batch_stats(
            _batch_stats_step(model),
            train_state.params,
            train_state.model_state,
            store.stage(stages[-1]),
            config.train.batch_size,
            sharding=rows,
        )
        train_state = train_state.replace(model_state=new_state)
    bn_seconds = time.perf_counter() - bn_start

    def score(stage):  # outside the clock, like every validation pass
        return loop.evaluate(
            _predict_step(model),
            train_state.params,
            train_state.model_state,
            stage,
            config.train.eval_batch_size,
            store.feature_map.tasks,
            sharding=rows,
        )

    test_stage = store.stages("test")[0]
    test = score(test_stage) if score_test else functools.partial(score, test_stage)
    if timings is not None:
        timings["stage_seconds"] = per_stage
        timings["timed_compiles"] = compiles
        timings["precise_bn_seconds"] = bn_seconds
        timings["validation"] = score(store.stages("validation")[0])
    return test, seconds, samples


REFERENCE_METHODS = ("full_data", "cold_start", "warmup_start", "warm_full_data")
# Reference methods that start from the teacher's table (and continue its optimizer state).
_TEACHER_TABLE = ("warmup_start", "warm_full_data")
# Reference methods that train one epoch over every historical stage.
_FULL_HISTORY = ("full_data", "warm_full_data")


def finetune_rate(setting, rows_lr: float, config) -> float:
    """A reduced method's fine-tune rate by evaluate.finetune_lr: "train" (train.learning_rate),
    "rows" (`rows_lr`, the rate chosen for its rows) or a number (that rate; a string of one, as
    a command-line override of the string key gives)."""
    if setting == "train":
        return float(config.train.learning_rate)
    if setting == "rows":
        return float(rows_lr)
    return float(setting)


def _with_learning_rate(config, lr: float):
    """The config with train.learning_rate = lr (the whole model's Adam step), or itself."""
    if float(config.train.learning_rate) == lr:
        return config
    cfg = config.copy_and_resolve_references()
    cfg.train.learning_rate = lr
    return cfg


def _reference_run(
    method,
    model,
    store,
    config,
    teacher_embed,
    seed,
    stages,
    historical,
    lr,
    embed_opt,
    score_test: bool = True,
) -> CandidateResult:
    """One seed of a reference method at Adam step `lr`: one epoch per stage in `stages`.
    `score_test=False`: its metrics are a function that scores the test day (`_tested`)."""
    if method in _TEACHER_TABLE:
        params_dense, state = init_dense(model, seed)
        params = {"embed": teacher_embed, "dense": params_dense}
    else:
        params, state = init_full(model, seed)
    t: dict = {}
    test, seconds, samples = finetune_and_test(
        model,
        params,
        state,
        store,
        _with_learning_rate(config, lr),
        seed,
        stages,
        timings=t,
        embed_opt=embed_opt if method in _TEACHER_TABLE else None,
        score_test=score_test,
    )
    hist = sum(t["stage_seconds"].get(s, 0.0) for s in historical)
    info = {
        "stages": stages,
        "seed": seed,
        "historical_seconds": hist,
        "historical_epochs": 1 if method in _FULL_HISTORY else 0,
        "finetune_seconds": seconds - hist,
        "stage_seconds": t["stage_seconds"],
        "timed_compiles": t["timed_compiles"],
        "lr": lr,
        "val_auc": float(t["validation"]["auc"]),
        "precise_bn_seconds": t["precise_bn_seconds"],
    }
    return CandidateResult(test, seconds, samples, info)


def run_seeds(
    method: str,
    model: RecModel,
    store: StageStore,
    config,
    teacher_embed: dict,
    rows_by_seed: dict | None,
    seeds: list[int],
    val: ValidationRows | None = None,
    rows_pad: int = 0,
    embed_opt=None,
) -> list[CandidateResult]:
    """Trains and tests one candidate under `method`'s protocol once per seed.

    Reduced-data methods: the learning rate is chosen on the first seed, the evaluate.lr_grid as
    one vmapped group on its rows (pruned to its evaluate.lr_prune_keep best rates after
    evaluate.lr_prune_epochs epochs), by the best-epoch validation AUC (that member is the first
    seed's run; with evaluate.lr_select = "final", the evaluate.lr_select_top best members by that
    AUC (0 = all) are fine-tuned and the one whose fine-tuned model has the best validation AUC is
    chosen and kept); the other seeds train at
    that rate as one vmapped group (each its own init, row order and rows); every seed keeps its
    best epoch and is fine-tuned on the subsequent block.
    Full Data, Cold Start and Warmup Start train the whole model one epoch per stage, seed by
    seed, at train.learning_rate, or, with evaluate.reference_lr_grid, at the grid's rate whose
    final model has the best validation AUC on the first seed (each rate a run of its own).
    `rows_by_seed`: {seed: {"e", "logits"}} (the same dict for every seed when the method's rows
    do not depend on the seed). `rows_pad`: see `train_rows_group`'s `pad_to`. `embed_opt`: the
    teacher's table optimizer state (`inherited_embed_opt`), continued by every method that
    inherits the table (Warmup Start and the reduced ones); None = fresh.
    """
    fmap = store.feature_map
    subsequent = [s.name for s in fmap.stages_with_role("subsequent")]
    historical = [s.name for s in fmap.stages_with_role("historical")]
    out = []
    ev = config.evaluate
    if method in REFERENCE_METHODS:
        if method in _TEACHER_TABLE:
            _check_embedding(model, teacher_embed)
        stages = historical + subsequent if method in _FULL_HISTORY else subsequent
        ref_grid = [float(lr) for lr in ev.reference_lr_grid]

        def one(seed, lr, score_test=True):
            return _reference_run(
                method,
                model,
                store,
                config,
                teacher_embed,
                seed,
                stages,
                historical,
                lr,
                embed_opt,
                score_test,
            )

        by_seed, search = {}, {}
        if ref_grid:
            # The paper's protocol (5.1.4) for every model: the rate chosen on validation, on
            # the first seed (as the reduced methods'); the chosen run is that seed's result.
            runs = [one(seeds[0], lr, score_test=False) for lr in ref_grid]
            val_auc = [r.info["val_auc"] for r in runs]
            chosen = select_lr(ref_grid, np.asarray(val_auc)[:, None])
            lr = ref_grid[chosen]
            search = {
                "lr_grid": ref_grid,
                "lr_grid_val_auc": val_auc,
                "lr_search_seconds": sum(r.train_seconds for r in runs),
            }
            by_seed[seeds[0]] = _tested(runs[chosen])
        else:
            lr = float(config.train.learning_rate)
        for seed in seeds:
            if seed not in by_seed:
                by_seed[seed] = one(seed, lr)
            by_seed[seed].info.update(search)
            out.append(by_seed[seed])
        return out
    _check_embedding(model, teacher_embed)
    if rows_by_seed is None or any(s not in rows_by_seed for s in seeds):
        raise ValueError(f"Method {method!r} needs its rows (embeddings and soft labels).")
    val = val if val is not None else validation_rows(model, teacher_embed, store, config)

    def finish(
        res, g: int, size: int, seed: int, lr: float, search: dict, score_test: bool = True
    ) -> CandidateResult:
        """Member g of a trained rows group: its best epoch fine-tuned on the subsequent block
        and tested (`score_test=False`: later, by `_tested`)."""
        share = float(res["seconds_G"][g])  # its own seconds, or its share of a vmapped group
        params = {"embed": teacher_embed, "dense": group.unstack(res["params"], g)}
        t: dict = {}
        # The fine-tune continues the rows phase: at its chosen rate and from its Adam moments
        # when evaluate.finetune_lr / finetune_adam say "rows" (docs/evaluation.md).
        ft_config = _with_learning_rate(config, finetune_rate(ev.finetune_lr, lr, config))
        ft_adam = None
        if ev.finetune_adam == "rows":
            ft_adam = adam_moments(group.unstack(res["opt"], g))
        test, seconds, samples = finetune_and_test(
            model,
            params,
            group.unstack(res["state"], g),
            store,
            ft_config,
            seed,
            subsequent,
            timings=t,
            embed_opt=embed_opt,
            dense_adam=ft_adam,
            score_test=score_test,
        )
        info = {
            "seed": seed,
            "lr": lr,
            **search,
            "best_epoch": int(res["best_epoch"][g]),
            "val_auc_per_epoch": res["val_auc"][g].tolist(),
            "rows": int(res["rows"]),
            "rows_seconds": share,
            "rows_group_size": size,
            "historical_seconds": share,
            # Every epoch trains (evaluate.max_epochs; fewer for a rate pruned from the grid);
            # the best is kept.
            "historical_epochs": int(res["epochs"][g]),
            "finetune_seconds": seconds,
            "timed_compiles": t["timed_compiles"] + res["compiles"],
            "val_auc": float(t["validation"]["auc"]),
            "precise_bn_seconds": t["precise_bn_seconds"],
        }
        rows_samples = int(res["epochs"][g]) * int(res["rows"])
        return CandidateResult(test, share + seconds, rows_samples + samples, info)

    grid = [float(lr) for lr in ev.lr_grid]
    search, members = {}, {}  # members: seed -> (group result, member index, group size)
    finished = {}  # seed -> CandidateResult already fine-tuned (lr_select = "final")
    if grid:
        first = rows_by_seed[seeds[0]]
        a = train_rows_group(
            model,
            [first] * len(grid),
            [seeds[0]] * len(grid),
            grid,
            val,
            config,
            pad_to=rows_pad,
            prune=(int(ev.get("lr_prune_epochs", 0)), int(ev.get("lr_prune_keep", 0))),
        )
        rows_auc = np.max(np.where(np.isnan(a["val_auc"]), -np.inf, a["val_auc"]), axis=1)
        search = {
            "lr_grid": grid,
            "lr_grid_val_auc": rows_auc.tolist(),
            "lr_search_seconds": a["seconds"],
        }
        if ev.lr_select == "final":
            # The best epochs of the evaluate.lr_select_top best rates (by the rows' AUC; 0 =
            # every rate) fine-tuned; the rate whose final model (the one the protocol reports)
            # has the best validation AUC wins, as for the reference methods.
            top = int(ev.get("lr_select_top", 0)) or len(grid)
            tried = rates_by_rows_auc(rows_auc)[:top]
            runs = {
                g: finish(a, g, len(grid), seeds[0], grid[g], {}, score_test=False)
                for g in sorted(tried)
            }
            final_auc = np.full(len(grid), np.nan)
            for g, r in runs.items():
                final_auc[g] = r.info["val_auc"]
            chosen = select_lr(grid, final_auc[:, None])
            if chosen not in runs:  # every tried rate diverged: the rows' choice
                chosen = tried[0]
            search["lr_grid_final_val_auc"] = [None if np.isnan(x) else float(x) for x in final_auc]
            search["lr_search_seconds"] += sum(
                r.info["finetune_seconds"] for g, r in runs.items() if g != chosen
            )
            finished[seeds[0]] = _tested(runs[chosen])
            finished[seeds[0]].info.update(search)
        else:
            chosen = select_lr(grid, a["val_auc"])
        lr = grid[chosen]
        # The first seed's run at the chosen rate is the grid's member: same init, order, rows.
        members[seeds[0]] = (a, chosen, len(grid))
    else:
        lr = float(ev.learning_rate)
    rest = [s for s in seeds if s not in members]
    if rest:
        b = train_rows_group(
            model,
            [rows_by_seed[s] for s in rest],
            rest,
            [lr] * len(rest),
            val,
            config,
            pad_to=rows_pad,
        )
        members.update({s: (b, g, len(rest)) for g, s in enumerate(rest)})
    for seed in seeds:
        if seed in finished:
            out.append(finished[seed])
            continue
        res, g, size = members[seed]
        out.append(finish(res, g, size, seed, lr, search))
    return out


def _tested(run: CandidateResult) -> CandidateResult:
    """A run fine-tuned with score_test=False, now scored on the test day: only the chosen rate
    of a learning-rate search is (the others' test AUCs would be read by nobody)."""
    if callable(run.metrics):
        run = dataclasses.replace(run, metrics=run.metrics())
    return run


def run_candidate(
    method: str,
    model: RecModel,
    store: StageStore,
    config,
    teacher_embed: dict,
    rows: dict | None,
    seed: int,
    embed_opt=None,
) -> CandidateResult:
    """Trains and tests one candidate under `method`'s protocol, one seed (see `run_seeds`)."""
    by_seed = None if rows is None else {seed: rows}
    return run_seeds(
        method, model, store, config, teacher_embed, by_seed, [seed], embed_opt=embed_opt
    )[0]


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def adam_moments(opt_state):
    """The one optax.ScaleByAdamState in an optimizer state (count, mu, nu)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(x)]
    if len(found) != 1:
        raise ValueError(f"Expected one Adam state in the optimizer state, found {len(found)}.")
    return found[0]


def _continue_adam(opt_state: dict, adam: optax.ScaleByAdamState, name: str) -> dict:
    """The fine-tune's {"dense", "embed"} optimizer state with the dense Adam moments and step
    count replaced by `adam`'s (the same dense parameters, trained on rows before)."""
    if "dense" not in opt_state:
        raise ValueError(
            f"{name}: continuing the rows phase's Adam state needs a row-sparse "
            "train.embedding_optimizer (a separate dense optimizer state), not dense_adam."
        )
    mine = adam_moments(opt_state["dense"])
    if _layout(mine) != _layout(adam):
        raise ValueError(f"{name}: the rows phase's Adam state does not match the fine-tune's.")
    dense = jax.tree.map(lambda x: adam if _is_adam(x) else x, opt_state["dense"], is_leaf=_is_adam)
    return {**opt_state, "dense": dense}


def _layout(tree) -> tuple:
    """(tree structure, [(shape, dtype) per leaf]): what must agree for one tree to stand in for
    another (arrays or ShapeDtypeStructs)."""
    leaves = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(tree)]
    return jax.tree.structure(tree), leaves


def _check_embedding(model: RecModel, teacher_embed: dict) -> None:
    want = jax.eval_shape(lambda: model.init(jax.random.key(0))[0]["embed"])
    if _layout(want) != _layout(teacher_embed):
        raise ValueError(
            f"Candidate {model.name!r} cannot inherit the teacher's embedding table: it expects "
            f"{_layout(want)[1]}, the teacher has {_layout(teacher_embed)[1]}. Use one model.embed_dim for all."
        )
