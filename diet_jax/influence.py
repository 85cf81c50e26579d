"""Influence toolkit: EL2N scores and gradient inner products over a model's parameters.

A loss is `loss_fn(params, batch) -> losses_B`, one loss per sample, where `batch` is a pytree
whose leaves share a leading B axis and samples do not interact (BatchNorm in eval mode). A
`direction` is a pytree shaped like `params`. The influence of a sample x on a sample z is the
first-order utility of a gradient step on x for z (DIET eq. 15):

    A(x, z) = <grad_w l(w, z), grad_w l(w, x)>

Costs, with P parameters, B samples and C(B) the cost of one forward pass over B samples:

    el2n                 O(B K)
    per_sample_grads     ~3 C(B) time and B x P memory: the reference path, slow for large P
    grad_dot             ~2-3 C(B) time, memory of one forward pass: no per-sample gradient
    grad_sum             ~3 C(B) (one ordinary backward pass)
    linearize_losses     one forward pass shared by a grad_sum and any number of grad_dots
    pairwise             per-sample: both batches' per-sample gradients, B_a x B_b x P flops
    pairwise_ghost       Dense layers from layer inputs and output gradients (no B x P array);
                         other parameters by per-sample gradients
    deficiency           grad_sum over the memory + grad_dot over the real batch
    responsibility       grad_sum over the hard targets + grad_dot over the memory

All functions are pure and traceable (call them under `jax.jit`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diet_jax.train.steps import bce_per_sample

LossFn = Callable[[object, object], jax.Array]


# ------------------------------------------------------------------ scores


def el2n(logits_BxK: jax.Array, labels_BxK: jax.Array) -> jax.Array:
    """EL2N = ||sigmoid(logits) - y||_2 over the K tasks (DIET eq. 6)."""
    p_BxK = jax.nn.sigmoid(logits_BxK)
    return jnp.linalg.norm(p_BxK - labels_BxK.astype(p_BxK.dtype), axis=-1)


def dense_loss(model, model_state: dict) -> LossFn:
    """loss_fn(params_dense, {"e", "y"}) -> per-sample BCE summed over tasks, BatchNorm in eval.

    The influence parameters w are a recommender's dense parameters (the embedding is frozen);
    `y` are probabilities: 0/1 labels for real rows, sigmoid(soft logits) for synthetic rows.
    """

    def loss_fn(params_dense, batch):
        logits_BxK = model.dense(params_dense, model_state, batch["e"], train=False)[0]
        return bce_per_sample(logits_BxK, batch["y"])

    return loss_fn


# ------------------------------------------------------------------ gradients


def per_sample_grads(loss_fn: LossFn, params, batch):
    """Every sample's gradient, a pytree like `params` with a leading B axis: vmap(grad).

    The reference path: it materializes B x P numbers.
    """

    def one(sample):
        single = jax.tree.map(lambda a: a[None], sample)
        return jax.grad(lambda p: loss_fn(p, single)[0])(params)

    return jax.vmap(one)(batch)


def grad_sum(loss_fn: LossFn, params, batch, weights_B=None, *, chunk_size: int | None = None):
    """grad_w of sum_i weights_i * l_i: one backward pass (chunked for bounded memory)."""
    b = _batch_size(batch)
    w_B = jnp.ones((b,), jnp.float32) if weights_B is None else weights_B

    def weighted(p, chunk, w):
        losses = loss_fn(p, chunk)
        return jnp.sum(losses * w.astype(losses.dtype))

    if chunk_size is None or chunk_size >= b:
        return jax.grad(weighted)(params, batch, w_B)
    chunks, w_CxS = _chunk(batch, chunk_size), _chunk(_pad_weights(w_B, chunk_size), chunk_size)

    def body(acc, xs):
        g = jax.grad(weighted)(params, *xs)
        return jax.tree.map(jnp.add, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(body, zeros, (chunks, w_CxS))[0]


def grad_dot(loss_fn: LossFn, params, batch, direction, *, chunk_size: int | None = None):
    """<grad l_i, direction> for every sample i, in one forward-mode pass (jax.jvp).

    The directional derivative of the vector of per-sample losses is exactly the vector of
    per-sample gradient dot products; no per-sample gradient is formed. `chunk_size` bounds the
    memory for large batches (a `lax.map` over chunks).
    """
    direction = jax.tree.map(lambda d, p: jnp.asarray(d, p.dtype), direction, params)

    def dots(chunk):
        return jax.jvp(lambda p: loss_fn(p, chunk), (params,), (direction,))[1]

    b = _batch_size(batch)
    if chunk_size is None or chunk_size >= b:
        return dots(batch)
    out_CxS = jax.lax.map(dots, _chunk(batch, chunk_size))
    return out_CxS.reshape(-1)[:b]


def linearize_losses(loss_fn: LossFn, params, batch):
    """One forward pass over `batch`, shared by its gradient sums and its gradient dots.

    Returns (losses_B, dots, grad_of_sum): `dots(direction)` equals `grad_dot(loss_fn, params,
    batch, direction)` and `grad_of_sum(weights_B)` equals `grad_sum(loss_fn, params, batch,
    weights_B)`, both evaluated on the linearization (jax.linearize) of the per-sample losses at
    `params`: the primal pass is run once, whatever number of calls follow. The price is memory:
    the linearization keeps the forward pass's activations for the whole batch (no chunking).
    """
    losses_B, jvp_fn = jax.linearize(lambda p: loss_fn(p, batch), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)

    def dots(direction):
        return jvp_fn(jax.tree.map(lambda d, p: jnp.asarray(d, p.dtype), direction, params))

    def grad_of_sum(weights_B=None):
        w_B = jnp.ones_like(losses_B) if weights_B is None else weights_B.astype(losses_B.dtype)
        return vjp_fn(w_B)[0]

    return losses_B, dots, grad_of_sum


# ------------------------------------------------------------------ pairwise A(x, z)


def pairwise(loss_fn_a: LossFn, loss_fn_b: LossFn, params, batch_a, batch_b, *, method="vmap"):
    """A_AxB[i, j] = <grad l_a(x_i), grad l_b(z_j)>, the full influence matrix of two batches.

    `method="vmap"` flattens both batches' per-sample gradients; `method="ghost"` uses the
    ghost form for Dense layers (`pairwise_ghost`).
    """
    if method == "ghost":
        return pairwise_ghost(loss_fn_a, loss_fn_b, params, batch_a, batch_b)
    if method != "vmap":
        raise ValueError(f"Unsupported pairwise method: {method!r}; use 'vmap' or 'ghost'.")
    g_a = _flat(per_sample_grads(loss_fn_a, params, batch_a))
    g_b = _flat(per_sample_grads(loss_fn_b, params, batch_b))
    return g_a @ g_b.T


def pairwise_ghost(loss_fn_a: LossFn, loss_fn_b: LossFn, params, batch_a, batch_b):
    """The influence matrix without per-sample gradients of the Dense layers (ghost dots).

    For a Dense layer s = a W + b with output gradient d = dl/ds, grad_W l_i = sum_t a_it d_it^T,
    so <grad_W l_i, grad_W l_j> = sum_{t,t'} (a_it . a_jt')(d_it . d_jt'), the bias adding
    (d_i . d_j): per layer (A_a A_b^T) * (D_a D_b^T), two small matrix products. Inputs and
    output gradients of every `flax.linen.Dense` are captured with a method interceptor and zero
    perturbations on the outputs. Parameters outside Dense layers (DCN's cross biases) go through
    per-sample gradients. `loss_fn` must apply its flax module with `{"params": params}` at the
    root, so that module paths address `params`.
    """
    fa = _ghost_factors(loss_fn_a, params, batch_a)
    fb = _ghost_factors(loss_fn_b, params, batch_b)
    out = fa["rest"] @ fb["rest"].T
    for key, (a_a, d_a) in fa["dense"].items():
        a_b, d_b = fb["dense"][key]
        aa = jnp.einsum("itd,jsd->ijts", a_a, a_b)
        dd = jnp.einsum("itp,jsp->ijts", d_a, d_b)
        out = out + jnp.sum(aa * dd, axis=(2, 3))
    return out


# ------------------------------------------------------------------ DIET sums


def deficiency(
    loss_fn_real: LossFn,
    loss_fn_syn: LossFn,
    params,
    batch_real,
    batch_syn,
    syn_weights_N=None,
    *,
    chunk_size: int | None = None,
):
    """Deficiency(z) = sum_{x in memory} A(x, z) for every real z (DIET eq. 16).

    = <grad l(z), G_syn> with G_syn = grad of the summed memory loss: one backward pass over
    the memory and one jvp over the real batch.
    """
    g_syn = grad_sum(loss_fn_syn, params, batch_syn, syn_weights_N, chunk_size=chunk_size)
    return grad_dot(loss_fn_real, params, batch_real, g_syn, chunk_size=chunk_size)


def responsibility(
    loss_fn_syn: LossFn,
    loss_fn_real: LossFn,
    params,
    batch_syn,
    batch_hard,
    hard_weights_B=None,
    *,
    chunk_size: int | None = None,
):
    """Resp(x) = sum_{z in hard targets} A(x, z) for every memory row x (DIET eq. 17).

    = <grad l(x), G_hard>: one backward pass over the hard targets and one jvp over the memory.
    Memory fusion's alpha_i = A((e_i, y_i), S_t) is the same sum with S_t as the targets.
    """
    g_hard = grad_sum(loss_fn_real, params, batch_hard, hard_weights_B, chunk_size=chunk_size)
    return grad_dot(loss_fn_syn, params, batch_syn, g_hard, chunk_size=chunk_size)


# ------------------------------------------------------------------ helpers


def _batch_size(batch) -> int:
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"Batch leaves must share one leading size, got {sorted(sizes)}.")
    return sizes.pop()


def _chunk(batch, chunk_size: int):
    """Pads the leading axis to a multiple of chunk_size (repeating the last row, so no NaNs
    appear in padding) and reshapes every leaf to [chunks, chunk_size, ...]."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")

    def one(a):
        short = -a.shape[0] % chunk_size
        if short:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], short, axis=0)])
        return a.reshape(-1, chunk_size, *a.shape[1:])

    return jax.tree.map(one, batch)


def _pad_weights(w_B, chunk_size: int):
    short = -w_B.shape[0] % chunk_size
    return jnp.concatenate([w_B, jnp.zeros((short,), w_B.dtype)]) if short else w_B


def _flat(tree_B):
    """Pytree with a leading B axis -> [B, P]."""
    leaves = jax.tree.leaves(tree_B)
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def _dense_key(module: nn.Module) -> str:
    return "/".join(module.scope.path)


def _run_intercepted(loss_fn, params, batch, perturb):
    """loss_fn with Dense outputs shifted by `perturb[key][call]`; returns (losses, inputs).

    With `perturb=None` it only records shapes (an eval_shape pass).
    """
    inputs: dict[str, list] = {}
    outputs: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        key = _dense_key(context.module)
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        call = len(inputs.setdefault(key, []))
        inputs[key].append(x)
        outputs.setdefault(key, []).append(y)
        return y if perturb is None else y + perturb[key][call]

    with nn.intercept_methods(interceptor):
        losses = loss_fn(params, batch)
    return losses, inputs, outputs


def _ghost_factors(loss_fn, params, batch):
    """Per Dense layer: inputs a [B, T, d(+1)] and output gradients d [B, T, p]; plus the
    flattened per-sample gradients of every parameter outside Dense layers, [B, P_rest]."""
    shapes = jax.eval_shape(lambda p, b: _run_intercepted(loss_fn, p, b, None)[2], params, batch)
    perturb = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def total(pert):
        losses, inputs, _ = _run_intercepted(loss_fn, params, batch, pert)
        return jnp.sum(losses), inputs

    grads, inputs = jax.grad(total, has_aux=True)(perturb)
    b = _batch_size(batch)
    dense, covered = {}, set()
    for key in inputs:
        path = tuple(key.split("/")) if key else ()
        node = params
        for name in path:
            if not isinstance(node, dict) or name not in node:
                raise ValueError(
                    f"Dense layer {key!r} is not found in params: the loss must apply its module "
                    "with {'params': params} at the root for the ghost form."
                )
            node = node[name]
        a = jnp.concatenate([x.reshape(b, -1, x.shape[-1]) for x in inputs[key]], axis=1)
        d = jnp.concatenate([g.reshape(b, -1, g.shape[-1]) for g in grads[key]], axis=1)
        if "bias" in node:
            a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=-1)
            covered.add((*path, "bias"))
        covered.add((*path, "kernel"))
        dense[key] = (a, d)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [tuple(getattr(k, "key", str(k)) for k in kp) for kp, _ in leaves]
    rest_idx = [i for i, n in enumerate(names) if n not in covered]
    values = [v for _, v in leaves]
    if rest_idx:

        def loss_rest(rest, b_):
            merged = list(values)
            for i, v in zip(rest_idx, rest, strict=True):
                merged[i] = v
            return loss_fn(jax.tree_util.tree_unflatten(treedef, merged), b_)

        rest = _flat(per_sample_grads(loss_rest, [values[i] for i in rest_idx], batch))
    else:
        rest = jnp.zeros((b, 0), jax.tree.leaves(params)[0].dtype)
    return {"dense": dense, "rest": rest}
