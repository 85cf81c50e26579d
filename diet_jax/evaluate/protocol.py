"""The candidate protocol (warm-up style, the paper's section 4.2.2) and the data-free methods.

Reduced-data methods (random, el2n, kmeans, diet): a candidate inherits the final teacher's
embedding table; its dense network, freshly initialised, trains on the (embedding, soft label)
rows for up to `evaluate.max_epochs` epochs with Adam, keeping the epoch whose full model has the
best AUC on the real validation day; then the whole model is fine-tuned one epoch on the
subsequent block and evaluated on the test day.

Reference methods: full_data (from scratch, one epoch over every historical stage and the
subsequent block, in time order), cold_start (from scratch, subsequent block only),
warmup_start (teacher embeddings + fresh dense network, subsequent block only).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diet_jax import parallel
from diet_jax.data import loader
from diet_jax.data.store import StageStore
from diet_jax.models.factory import RecModel
from diet_jax.train import loop
from diet_jax.train.steps import bce_per_sample, make_predict_step, make_trainer


@dataclasses.dataclass
class CandidateResult:
    metrics: dict  # test metrics of the final model
    train_seconds: float  # training only: rows epochs + fine-tune (validation passes excluded)
    train_samples: int
    info: dict  # best epoch, validation AUC per epoch, ...


def make_rows_epoch(
    model: RecModel, tx: optax.GradientTransformation, batch_size: int, sharding=None
):
    """A jitted epoch over in-memory rows: (params_dense, state, opt_state, e, logits, order) -> ...

    The soft target of a row is sigmoid(logits); the loss is the sum over tasks of BCE, averaged
    over rows. The batches of the epoch run in one `lax.scan`: no host round trip per step.
    `order` is a permutation of the rows padded with -1 to a multiple of `batch_size`.
    `sharding` (`parallel.batch_sharding`): every batch split over the mesh, the inputs replicated.
    """

    def loss_fn(params_dense, state, e_BxFxD, t_BxK, w_B):
        logits, new_state, aux = model.dense(params_dense, state, e_BxFxD, train=True)
        loss = jnp.sum(bce_per_sample(logits, t_BxK) * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)
        return loss + aux, (loss, new_state)

    @jax.jit
    def epoch(params_dense, state, opt_state, e_NxFxD, logits_NxK, order_P):
        def step(carry, idx_B):
            p, s, o = carry
            if sharding is not None:  # each device gathers and trains on its share of the batch
                idx_B = jax.lax.with_sharding_constraint(idx_B, sharding)
            w_B = (idx_B >= 0).astype(jnp.float32)
            idx_B = jnp.maximum(idx_B, 0)
            t_BxK = jax.nn.sigmoid(logits_NxK[idx_B])
            grads, (loss, s) = jax.grad(loss_fn, has_aux=True)(p, s, e_NxFxD[idx_B], t_BxK, w_B)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), s, o), loss

        (p, s, o), losses = jax.lax.scan(
            step, (params_dense, state, opt_state), order_P.reshape(-1, batch_size)
        )
        return p, s, o, jnp.mean(losses)

    return epoch


def padded_order(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n).astype(np.int32)
    return np.concatenate([order, np.full((-n) % batch_size, -1, np.int32)])


# Jitted functions are built once per model (and per hyperparameters) for the whole run, so a
# candidate trained under seven methods compiles its steps once, not seven times.
@functools.cache
def _predict_step(model: RecModel):
    return make_predict_step(model)


@functools.cache
def _rows_epoch(
    model: RecModel, batch_size: int, learning_rate: float, max_grad_norm: float, sharding=None
):
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))
    return tx, make_rows_epoch(model, tx, batch_size, sharding)


_TRAINERS: dict = {}


def _trainer(model: RecModel, train_cfg):
    key = (model, train_cfg.to_json())
    if key not in _TRAINERS:
        _TRAINERS[key] = make_trainer(model, train_cfg)  # the configured embedding optimizer
    return _TRAINERS[key]


def train_on_rows(
    model: RecModel, params_embed: dict, rows: dict, store: StageStore, config, seed: int
):
    """Trains a fresh dense network on rows {"e": [N,F,D], "logits": [N,K]} under fixed embeddings.

    Returns (params_dense, state, info) of the epoch with the best validation AUC of the full model.
    """
    ev = config.evaluate
    e, logits = jnp.asarray(rows["e"], jnp.float32), jnp.asarray(rows["logits"], jnp.float32)
    n = int(e.shape[0])
    bs = min(ev.rows_batch_size, n)
    # Scale-out: rows and parameters replicated, each batch split over the data axis (when the
    # batch, capped at the number of rows, divides over it).
    mesh = parallel.mesh_from_config(config)
    rows_sharding = parallel.batch_sharding(mesh) if bs % parallel.data_size(mesh) == 0 else None
    put = functools.partial(parallel.put_replicated, mesh=mesh)
    tx, epoch_fn = _rows_epoch(
        model, bs, float(ev.learning_rate), float(config.train.max_grad_norm), rows_sharding
    )
    params_dense, state = model.init_dense(jax.random.key(seed))
    opt_state = tx.init(params_dense)
    params_dense, state, opt_state, e, logits = put((params_dense, state, opt_state, e, logits))
    rng = np.random.default_rng(seed)
    # Compiled ahead of time so that training time excludes compilation, as for every method.
    order = put(jnp.asarray(padded_order(n, bs, rng)))
    epoch_fn = epoch_fn.lower(params_dense, state, opt_state, e, logits, order).compile()
    validation = store.stages("validation")[0]
    best, val_aucs, seconds = None, [], 0.0
    for epoch in range(ev.max_epochs):
        start = time.perf_counter()
        params_dense, state, opt_state, loss = epoch_fn(
            params_dense, state, opt_state, e, logits, put(jnp.asarray(padded_order(n, bs, rng)))
        )
        jax.block_until_ready(params_dense)
        seconds += time.perf_counter() - start
        if not np.isfinite(float(loss)):
            raise FloatingPointError(
                f"{model.name}: loss on rows became {float(loss)} at epoch {epoch}."
            )
        full = {"embed": params_embed, "dense": params_dense}
        val = loop.evaluate(
            _predict_step(model),
            full,
            state,
            validation,
            config.train.eval_batch_size,
            store.feature_map.tasks,
            sharding=parallel.batch_sharding(mesh),
        )
        val_aucs.append(val["auc"])
        if best is None or val["auc"] > best[0]:
            best = (val["auc"], epoch, params_dense, state)
    info = {
        "best_epoch": best[1],
        "val_auc_per_epoch": val_aucs,
        "rows": n,
        "rows_seconds": seconds,
    }
    return best[2], best[3], info, seconds, ev.max_epochs * n


def _copy(tree):
    """A fresh buffer for every leaf: the fine-tune step donates its state."""
    return jax.tree.map(jnp.copy, tree)


_WARM: set = set()


def _warm_up(trainer, train_state, stage, batch_size: int, sharding=None) -> None:
    """Compiles the train step outside the timed epochs: one step on a throwaway copy."""
    if id(trainer) in _WARM:
        return
    batch = next(iter(loader.device_batches(stage, batch_size, shuffle=False, sharding=sharding)))
    jax.block_until_ready(trainer.step(_copy(train_state), batch))
    _WARM.add(id(trainer))


def finetune_and_test(
    model: RecModel, params: dict, state: dict, store: StageStore, config, seed: int, stages
):
    """One epoch per stage in `stages` (names, in order) on the whole model, then test metrics."""
    trainer = _trainer(model, config.train)
    train_state = trainer.init(_copy(params), _copy(state))
    mesh = parallel.mesh_from_config(config)  # scale-out: as the teacher (train/reference.py)
    if mesh is not None:
        shard = config.parallel.shard_embeddings
        shardings = parallel.state_shardings(train_state, mesh, shard_embeddings=shard)
        train_state = parallel.put(train_state, shardings)
    rows = parallel.batch_sharding(mesh)
    step = trainer.step
    _warm_up(trainer, train_state, store.stage(stages[0]), config.train.batch_size, rows)
    seconds, samples = 0.0, 0
    for i, name in enumerate(stages):
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
        seconds += stats["seconds"]
        samples += stats["samples"]
    test = loop.evaluate(
        _predict_step(model),
        train_state.params,
        train_state.model_state,
        store.stages("test")[0],
        config.train.eval_batch_size,
        store.feature_map.tasks,
        sharding=rows,
    )
    return test, seconds, samples


def run_candidate(
    method: str,
    model: RecModel,
    store: StageStore,
    config,
    teacher_embed: dict,
    rows: dict | None,
    seed: int,
) -> CandidateResult:
    """Trains and tests one candidate under `method`'s protocol."""
    fmap = store.feature_map
    subsequent = [s.name for s in fmap.stages_with_role("subsequent")]
    historical = [s.name for s in fmap.stages_with_role("historical")]
    if method in ("full_data", "cold_start"):
        params, state = model.init(jax.random.key(seed))
        stages = historical + subsequent if method == "full_data" else subsequent
        test, seconds, samples = finetune_and_test(
            model, params, state, store, config, seed, stages
        )
        return CandidateResult(test, seconds, samples, {"stages": stages})
    _check_embedding(model, teacher_embed)
    if method == "warmup_start":
        params_dense, state = model.init_dense(jax.random.key(seed))
        params = {"embed": teacher_embed, "dense": params_dense}
        test, seconds, samples = finetune_and_test(
            model, params, state, store, config, seed, subsequent
        )
        return CandidateResult(test, seconds, samples, {"stages": subsequent})
    if rows is None:
        raise ValueError(f"Method {method!r} needs its rows (embeddings and soft labels).")
    params_dense, state, info, rows_seconds, rows_samples = train_on_rows(
        model, teacher_embed, rows, store, config, seed
    )
    params = {"embed": teacher_embed, "dense": params_dense}
    test, seconds, samples = finetune_and_test(
        model, params, state, store, config, seed, subsequent
    )
    info["finetune_seconds"] = seconds
    return CandidateResult(test, rows_seconds + seconds, rows_samples + samples, info)


def _check_embedding(model: RecModel, teacher_embed: dict) -> None:
    want = jax.eval_shape(lambda: model.init(jax.random.key(0))[0]["embed"])
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), teacher_embed)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(
        want
    ) != jax.tree.leaves(got):
        raise ValueError(
            f"Candidate {model.name!r} cannot inherit the teacher's embedding table: it expects "
            f"{jax.tree.leaves(want)}, the teacher has {jax.tree.leaves(got)}. Use one model.embed_dim for all."
        )
