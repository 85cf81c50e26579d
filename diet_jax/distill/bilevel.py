"""DIET phase 2 (Algorithm 2): one outer iteration of influence-guided bi-level distillation.

    1. embed a real minibatch with the stage teacher's frozen table;
    2. address the memory (hard targets by deficiency, active rows by responsibility);
    3. proxy theta_0: random (stage 1) or the previous teacher's dense parameters;
    4. RaT-BPTT: draw a window start s uniformly in [0, M - W]; run s SGD steps on the active
       rows with nothing differentiated, then W steps that are; theta_{s+W} is the final proxy
       (the unroll length is random, as in RaT-BPTT; s = M - W gives theta_M);
    5. meta loss = BCE of the final proxy on the hard targets; its gradient with respect to the
       active rows' embeddings and soft labels feeds an optax optimizer (Adam, clipped).

`make_outer_step` returns the whole iteration as one jitted function. The lower-level pieces
(`inner_step`, `unroll`, `prefix`, `meta_loss`, `truncated_meta_grad`) are public for tests and
other bi-level code.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import optax

from diet_jax import influence
from diet_jax.distill import addressing
from diet_jax.distill.memory import Memory
from diet_jax.models.factory import RecModel
from diet_jax.train.steps import bce_per_sample

INFLUENCE_AT = ("proxy", "teacher")


@dataclasses.dataclass(frozen=True)
class BilevelConfig:
    """Static settings of the outer step (hashable: part of the jit cache key)."""

    inner_steps: int  # M
    window: int  # W, the differentiated steps
    inner_lr: float  # alpha
    hard_size: int  # |B_hard|
    active_size: int  # |M_active|
    target_selection: bool = True
    memory_selection: bool = True
    learn_labels: bool = True
    influence_at: str = "proxy"  # where A(x, z) is taken: theta_0 or the stage teacher phi_t
    remat: bool = False
    chunk_size: int | None = None  # addressing over the memory in chunks (bounded memory)
    address_pool: int = 0  # address a random pool of this many memory rows (0: all rows)

    def __post_init__(self):
        if not 1 <= self.window <= self.inner_steps:
            raise ValueError(
                f"window must lie in [1, inner_steps={self.inner_steps}], got {self.window}."
            )
        if self.inner_lr <= 0:
            raise ValueError(f"inner_lr must be positive, got {self.inner_lr}.")
        if self.influence_at not in INFLUENCE_AT:
            raise ValueError(
                f"Unsupported influence_at: {self.influence_at!r}; use one of {INFLUENCE_AT}."
            )


@flax.struct.dataclass
class DistillState:
    step: jax.Array  # int32, outer iterations done
    syn: dict  # {"e": [N, F, D], "logits": [N, K]}: the trainable memory
    opt_state: optax.OptState
    key: jax.Array  # uint32 raw key data (checkpointable); iteration k uses fold_in(key, k)


def make_meta_optimizer(distill_cfg) -> optax.GradientTransformation:
    """Adam on the embeddings and on the soft labels (own learning rates), after clipping the
    meta-gradient by global norm; labels frozen when `learn_labels` is off."""
    label_tx = (
        optax.adam(distill_cfg.meta_lr_labels) if distill_cfg.learn_labels else optax.set_to_zero()
    )
    tx = optax.multi_transform(
        {"e": optax.adam(distill_cfg.meta_lr_embed), "logits": label_tx},
        {"e": "e", "logits": "logits"},
    )
    if distill_cfg.max_grad_norm and distill_cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(distill_cfg.max_grad_norm), tx)
    return tx


def init_state(
    memory: Memory, tx: optax.GradientTransformation, seed: int, capacity: int | None = None
) -> DistillState:
    """The phase-2 state of a memory, its rows padded with zeros to `capacity` (default: its
    size). Padded rows are masked out by `ctx["valid"]`; their gradient is zero, so Adam never
    moves them."""
    n = len(memory)
    capacity = n if capacity is None else capacity
    if capacity < n:
        raise ValueError(f"capacity {capacity} is below the memory's {n} rows.")
    syn = jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.zeros((capacity - n, *a.shape[1:]), a.dtype)]),
        memory.trainable(),
    )  # a fresh copy: the step donates its state
    state = DistillState(
        step=jnp.zeros((), jnp.int32),
        syn=syn,
        opt_state=tx.init(syn),
        key=jax.random.key_data(jax.random.key(seed)),
    )
    if jax.process_count() > 1:  # multi-host: the memory is global; the driver places the state
        return state
    # Committed like the step's outputs, so the second call does not compile again.
    return jax.device_put(state, jax.devices()[0])


def stage_context(teacher, proxy, rows: int, capacity: int, random_init: bool) -> dict:
    """The outer step's per-stage inputs: phi_t (`teacher`, its table embeds the real batch),
    theta_0 (`proxy`'s dense part, or a fresh draw every iteration when `random_init`), and the
    validity mask of the padded memory. All arrays: every stage shares one compiled step."""
    return {
        "embed": teacher.params["embed"],
        "teacher_dense": teacher.params["dense"],
        "teacher_state": teacher.model_state,
        "proxy_dense": proxy.params["dense"],
        "proxy_state": proxy.model_state,
        "valid": jnp.arange(capacity) < rows,
        "random_init": jnp.asarray(random_init),
    }


# ------------------------------------------------------------------ inner loop


def inner_loss(model: RecModel, params, state, syn):
    """Mean over rows of BCE against the soft targets sigmoid(y~), summed over tasks (+ aux)."""
    logits_BxK, new_state, aux = model.dense(params, state, syn["e"], train=True)
    loss = jnp.mean(bce_per_sample(logits_BxK, jax.nn.sigmoid(syn["logits"])))
    return loss + aux, new_state


def inner_step(model: RecModel, lr: float, carry, syn):
    """theta <- theta - lr grad L_syn(theta; syn) (eq. 18); BatchNorm statistics carried."""
    params, state = carry
    grads, state = jax.grad(functools.partial(inner_loss, model), has_aux=True)(params, state, syn)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), state


def unroll(model: RecModel, params, state, syn, steps: int, lr: float, remat: bool = False):
    """`steps` (static) inner steps in a lax.scan; differentiable with respect to syn."""
    body = functools.partial(inner_step, model, lr)
    if remat:
        body = jax.checkpoint(body)
    carry, _ = jax.lax.scan(lambda c, _: (body(c, syn), None), (params, state), None, length=steps)
    return carry


def prefix(model: RecModel, params, state, syn, start, lr: float):
    """The first `start` (traced) inner steps with nothing differentiated: RaT-BPTT's
    truncation. A while loop, so only `start` steps are paid for."""
    params, state, syn = jax.lax.stop_gradient((params, state, syn))
    step = functools.partial(inner_step, model, lr)
    return jax.lax.fori_loop(0, start, lambda _, c: step(c, syn), (params, state))


def meta_loss(model: RecModel, syn, params, state, hard, *, window: int, lr: float, remat=False):
    """(BCE of theta_W on the hard targets, theta_W's logits), theta_W after `window` steps."""
    params, state = unroll(model, params, state, syn, window, lr, remat)
    logits_BxK = model.dense(params, state, hard["e"], train=False)[0]
    return jnp.mean(bce_per_sample(logits_BxK, hard["y"])), logits_BxK


def truncated_meta_grad(
    model: RecModel, syn, params0, state0, hard, start, *, window: int, lr: float, remat=False
):
    """RaT-BPTT meta-gradient: `start` steps held constant, then `window` differentiated steps.

    Returns (meta loss, d loss / d syn, final proxy logits on the hard targets).
    """
    params, state = prefix(model, params0, state0, syn, start, lr)
    (loss, logits), grads = jax.value_and_grad(
        functools.partial(meta_loss, model, window=window, lr=lr, remat=remat), has_aux=True
    )(syn, params, state, hard)
    return loss, grads, logits


# ------------------------------------------------------------------ one outer iteration


def make_outer_step(model: RecModel, cfg: BilevelConfig, tx: optax.GradientTransformation):
    """Returns outer_step(dstate, batch, ctx) -> (dstate, metrics), jitted once.

    `batch` = {"x", "y", "w"} (a real minibatch of stage t); `ctx` from `stage_context`.
    `dstate` is donated.
    """
    m, w = cfg.inner_steps, cfg.window

    def outer_step(dstate: DistillState, batch: dict, ctx: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(dstate.key), dstate.step)
        k_init, k_window, k_address, k_pool = jax.random.split(key, 4)
        # theta_0: a fresh random draw (stage 1) or the previous teacher's dense parameters.
        params0, state0 = jax.tree.map(
            lambda r, p: jnp.where(ctx["random_init"], r, p),
            model.init_dense(k_init),
            (ctx["proxy_dense"], ctx["proxy_state"]),
        )

        # (1) bidirectional memory addressing, at theta_0 or at the teacher.
        syn = dstate.syn
        if not cfg.learn_labels:
            syn = {"e": syn["e"], "logits": jax.lax.stop_gradient(syn["logits"])}
        e_real = model.embed(ctx["embed"], batch["x"])
        real = {"e": e_real, "y": batch["y"].astype(jnp.float32), "w": batch["w"]}
        mem = {"e": syn["e"], "y": jax.nn.sigmoid(syn["logits"])}
        valid = ctx["valid"]
        capacity = valid.shape[0]
        if 0 < cfg.address_pool < capacity:
            # Cost control: the sums over the memory are taken over a fresh uniform pool of
            # valid rows (an unbiased estimate of Deficiency up to scale; Resp exact on the
            # pool), and the active rows are the pool's most responsible ones.
            pool = addressing.random_subset(k_pool, capacity, cfg.address_pool, valid)
            mem, valid = jax.tree.map(lambda a: a[pool], (mem, valid))
        else:
            pool = None
        if cfg.influence_at == "proxy":
            w_inf, s_inf = params0, state0
        else:
            w_inf, s_inf = ctx["teacher_dense"], ctx["teacher_state"]
        hard_idx, active_idx, stats = addressing.address(
            influence.dense_loss(model, s_inf),
            w_inf,
            real,
            mem,
            hard_size=cfg.hard_size,
            active_size=cfg.active_size,
            key=k_address,
            # Every real sample is a target when hard_size covers the batch: no ranking needed.
            target_selection=cfg.target_selection and cfg.hard_size < e_real.shape[0],
            memory_selection=cfg.memory_selection,
            syn_valid_N=valid,
            chunk_size=cfg.chunk_size,
        )
        if pool is not None:
            active_idx = pool[active_idx]
        hard = {"e": e_real[hard_idx], "y": real["y"][hard_idx]}

        # (2) bi-level update with RaT-BPTT, differentiating the gather from the full memory.
        start = jax.random.randint(k_window, (), 0, m - w + 1)
        params_s, state_s = prefix(
            model, params0, state0, jax.tree.map(lambda a: a[active_idx], syn), start, cfg.inner_lr
        )

        def loss_of_memory(syn_full):
            active = jax.tree.map(lambda a: a[active_idx], syn_full)
            return meta_loss(
                model, active, params_s, state_s, hard, window=w, lr=cfg.inner_lr, remat=cfg.remat
            )

        (loss, hard_logits), grads = jax.value_and_grad(loss_of_memory, has_aux=True)(syn)
        updates, opt_state = tx.update(grads, dstate.opt_state, dstate.syn)
        new = dstate.replace(
            step=dstate.step + 1,
            syn=optax.apply_updates(dstate.syn, updates),
            opt_state=opt_state,
        )
        metrics = {
            "meta_loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "window_start": start,
            "hard_logits": hard_logits,
            "hard_y": hard["y"],
            **stats,
        }
        return new, metrics

    return jax.jit(outer_step, donate_argnums=0)
