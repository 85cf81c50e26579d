"""Deficiency of a real batch against a synthetic memory: jvp path vs vmap'd per-sample gradients.

    python experiments/bench_influence.py --config=configs/synthetic.py [--sizes=1024,4096]

Deficiency(z) = sum_x A(x, z) = <grad l(z), G_syn>, with G_syn = grad sum_x l(x) one batch
gradient over the memory (the same in every path). The real samples are then scored:

  jvp     `grad_dot`: one forward-mode pass, no per-sample gradient (in chunks of
          --jvp_chunk rows, as is the G_syn pass);
  vmap    `per_sample_grads` (chunks of --vmap_chunk samples, materialized: B x P numbers)
          contracted with G_syn;
  ghost   the explicit double sum of eq. 16: the B x B matrix `pairwise_ghost`, summed over x
          (only for B <= --ghost_max).

"score" columns exclude the shared G_syn pass; "total" includes it.

"whole addressing" times DIET's full addressing step (distill/addressing.py), both directions:
G_syn, Deficiency of the B real rows, the hard targets (--hard_fraction of B), G_hard and the
Responsibility of the N memory rows, with chunks of --address_chunk rows (distill.chunk_size):

  shared     `addressing.address`: the memory's forward pass shared by G_syn and Resp
             (`influence.linearize_losses`), jvp scores;
  separate   `hard_targets` then `active_memory`: the same sums, each with its own passes (the
             formulation before the shared pass);
  vmap       the same steps with both scores from materialized per-sample gradients.

Model: the config's teacher (DCN + MMoE by default), dense parameters only, float32, jitted,
median of --repeats calls after a warm-up call (compilation excluded); wall and CPU (process)
seconds, since a shared CPU inflates wall time.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax import influence
from diet_jax.data.store import FeatureMap
from diet_jax.distill import addressing
from diet_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_SIZES = flags.DEFINE_list("sizes", ["1024", "4096"], "Real batch sizes (memory of the same size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path (the median is printed).")
_VMAP_CHUNK = flags.DEFINE_integer("vmap_chunk", 256, "Samples per chunk of per-sample gradients.")
_GHOST_MAX = flags.DEFINE_integer("ghost_max", 1024, "Largest batch for the ghost double sum.")
_JVP_CHUNK = flags.DEFINE_integer("jvp_chunk", 1024, "Rows per chunk of the G_syn pass and jvp.")
_ADDRESS_CHUNK = flags.DEFINE_integer(
    "address_chunk", 0, "Rows per chunk in the whole addressing step; 0 = distill.chunk_size."
)
_HARD_FRACTION = flags.DEFINE_float("hard_fraction", 0.1, "Hard targets per real batch.")
_ACTIVE = flags.DEFINE_integer("active", 50, "Active memory rows (window x inner steps).")


def timed(fn, *args, repeats: int) -> tuple[float, jax.Array]:
    return timed_cpu(fn, *args, repeats=repeats)[:2]


def timed_cpu(fn, *args, repeats: int) -> tuple[float, jax.Array, float]:
    """(median wall seconds, output, median CPU seconds of this process)."""
    out = jax.block_until_ready(fn(*args))  # compile
    times, cpu = [], []
    for _ in range(repeats):
        start, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - c0)
    return float(np.median(times)), out, float(np.median(cpu))


def main(_):
    config = _CONFIG.value
    d = config.data
    fmap = FeatureMap("bench", tuple(d.field_names), tuple(d.vocab_sizes), tuple(d.tasks), ())
    model = build_model(config.model, fmap, name=config.teacher.model)
    params, state = model.init_dense(jax.random.key(0))
    loss_fn = influence.dense_loss(model, state)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    f, k, dim = fmap.num_fields, fmap.num_tasks, config.model.embed_dim
    chunk = _VMAP_CHUNK.value

    jvp_chunk = _JVP_CHUNK.value or None

    @jax.jit
    def g_syn_pass(w, syn):
        return influence.grad_sum(loss_fn, w, syn, chunk_size=jvp_chunk)

    @jax.jit
    def jvp_score(w, real, g_syn):
        return influence.grad_dot(loss_fn, w, real, g_syn, chunk_size=jvp_chunk)

    @jax.jit
    def vmap_score(w, real, g_syn):
        def dots(chunk_batch):
            # The barrier keeps XLA from fusing the contraction into the per-sample gradients:
            # this path stands for "per-sample gradients materialized".
            psg = jax.lax.optimization_barrier(influence.per_sample_grads(loss_fn, w, chunk_batch))
            per_leaf = jax.tree.map(lambda g, v: jnp.tensordot(g, v, axes=v.ndim), psg, g_syn)
            return sum(jax.tree.leaves(per_leaf))

        b = real["y"].shape[0]
        out = jax.lax.map(dots, jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), real))
        return out.reshape(b)

    address_chunk = _ADDRESS_CHUNK.value or int(config.distill.chunk_size)

    def psg_dots(w, batch, direction):
        """<grad l_i, direction> from per-sample gradients, materialized chunk by chunk."""
        b = batch["y"].shape[0]
        c = min(chunk, b)

        def dots(chunk_batch):
            psg = jax.lax.optimization_barrier(influence.per_sample_grads(loss_fn, w, chunk_batch))
            per_leaf = jax.tree.map(lambda g, v: jnp.tensordot(g, v, axes=v.ndim), psg, direction)
            return sum(jax.tree.leaves(per_leaf))

        return jax.lax.map(dots, influence._chunk(batch, c)).reshape(-1)[:b]

    def make_address(mode, hard_size, active_size):
        @jax.jit
        def run(w, real, syn):
            if mode == "shared":
                hard_idx, active_idx, _ = addressing.address(
                    loss_fn,
                    w,
                    real,
                    syn,
                    hard_size=hard_size,
                    active_size=active_size,
                    key=jax.random.key(0),
                    chunk_size=address_chunk,
                )
                return hard_idx, active_idx
            if mode == "separate":
                hard_idx, _ = addressing.hard_targets(
                    loss_fn, w, real, syn, hard_size, chunk_size=address_chunk
                )
                hard = jax.tree.map(lambda a: a[hard_idx], real)
                active_idx, _ = addressing.active_memory(
                    loss_fn, w, syn, hard, active_size, chunk_size=address_chunk
                )
                return hard_idx, active_idx
            g_syn = influence.grad_sum(loss_fn, w, syn, chunk_size=address_chunk)
            hard_idx = jax.lax.top_k(-psg_dots(w, real, g_syn), hard_size)[1]
            hard = jax.tree.map(lambda a: a[hard_idx], real)
            g_hard = influence.grad_sum(loss_fn, w, hard, chunk_size=address_chunk)
            return hard_idx, jax.lax.top_k(psg_dots(w, syn, g_hard), active_size)[1]

        return run

    @jax.jit
    def ghost_total(w, real, syn):
        return influence.pairwise_ghost(loss_fn, loss_fn, w, syn, real).sum(axis=0)

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: "
        f"{config.teacher.model} + MMoE  dense params: {n_params:,}  (F={f}, D={dim}, K={k})"
    )
    for size in (int(s) for s in _SIZES.value):
        if size % chunk:
            raise ValueError(f"--sizes must be multiples of --vmap_chunk={chunk}, got {size}.")
        ks = jax.random.split(jax.random.key(size), 4)
        real = {
            "e": 0.05 * jax.random.normal(ks[0], (size, f, dim)),
            "y": jax.random.bernoulli(ks[1], 0.2, (size, k)).astype(jnp.float32),
        }
        syn = {
            "e": 0.05 * jax.random.normal(ks[2], (size, f, dim)),
            "y": jax.nn.sigmoid(jax.random.normal(ks[3], (size, k))),
        }
        r = _REPEATS.value
        t_g, g_syn = timed(g_syn_pass, params, syn, repeats=r)
        t_jvp, d_jvp = timed(jvp_score, params, real, g_syn, repeats=r)
        t_vmap, d_vmap = timed(vmap_score, params, real, g_syn, repeats=r)
        err = float(jnp.linalg.norm(d_jvp - d_vmap) / jnp.linalg.norm(d_vmap))
        print(
            f"B = memory = {size}:  G_syn pass {t_g * 1e3:.1f} ms\n"
            f"  score: jvp {t_jvp * 1e3:8.1f} ms  vmap {t_vmap * 1e3:9.1f} ms  "
            f"ratio {t_vmap / t_jvp:5.1f}x  (rel. diff {err:.1e})\n"
            f"  total: jvp {(t_g + t_jvp) * 1e3:8.1f} ms  vmap {(t_g + t_vmap) * 1e3:9.1f} ms  "
            f"ratio {(t_g + t_vmap) / (t_g + t_jvp):5.1f}x"
        )
        hard_size = max(1, int(round(_HARD_FRACTION.value * size)))
        active_size = min(_ACTIVE.value, size)
        whole = {}
        for mode in ("shared", "separate", "vmap"):
            whole[mode] = timed_cpu(
                make_address(mode, hard_size, active_size), params, real, syn, repeats=r
            )

        # FLOPs (XLA's cost analysis; no loops when size <= chunk) against CPU seconds: the rate of
        # the shared path next to that of one plain gradient pass over the memory (G_syn alone).
        def gflop(fn, *args):
            cost = fn.lower(*args).compile().cost_analysis()
            return (cost[0] if isinstance(cost, list) else cost)["flops"] / 1e9

        g_only = jax.jit(lambda w, b: influence.grad_sum(loss_fn, w, b, chunk_size=address_chunk))
        t_go, _, c_go = timed_cpu(g_only, params, syn, repeats=r)
        f_sh = gflop(make_address("shared", hard_size, active_size), params, real, syn)
        f_sep = gflop(make_address("separate", hard_size, active_size), params, real, syn)
        f_go = gflop(g_only, params, syn)
        same = all(
            bool(jnp.all(jnp.sort(a) == jnp.sort(b)))
            for a, b in zip(whole["shared"][1], whole["separate"][1], strict=True)
        )
        overlap = float(jnp.mean(jnp.isin(whole["shared"][1][0], whole["vmap"][1][0])))
        (t_sh, _, c_sh), (t_sep, _, c_sep), (t_vm, _, c_vm) = (
            whole[m] for m in ("shared", "separate", "vmap")
        )
        print(
            f"  whole addressing (hard {hard_size}, active {active_size}, chunk "
            f"{address_chunk}; load {os.getloadavg()[0]:.1f}, shared CPU):\n"
            f"    shared {t_sh * 1e3:8.1f} ms wall {c_sh * 1e3:8.1f} ms CPU\n"
            f"    separate {t_sep * 1e3:6.1f} ms wall {c_sep * 1e3:8.1f} ms CPU\n"
            f"    vmap {t_vm * 1e3:10.1f} ms wall {c_vm * 1e3:8.1f} ms CPU\n"
            f"    ratio vmap / shared {t_vm / t_sh:5.1f}x wall {c_vm / c_sh:5.1f}x CPU; "
            f"vmap / separate {t_vm / t_sep:5.1f}x wall {c_vm / c_sep:5.1f}x CPU\n"
            f"    same selections shared = separate: {same}; hard targets shared in vmap's: "
            f"{overlap:.2f}\n"
            f"    GFLOP: shared {f_sh:.2f} ({f_sh / c_sh:.0f} GFLOP/CPU-s), separate {f_sep:.2f} "
            f"({f_sep / c_sep:.0f}/CPU-s), one G_syn gradient pass {f_go:.2f} "
            f"({f_go / c_go:.0f}/CPU-s, {c_go * 1e3:.1f} ms CPU); shared = "
            f"{f_sh / f_go:.2f} gradient passes"
        )
        if size <= _GHOST_MAX.value:
            t_ghost, d_ghost = timed(ghost_total, params, real, syn, repeats=r)
            err = float(jnp.linalg.norm(d_ghost - d_vmap) / jnp.linalg.norm(d_vmap))
            print(
                f"  ghost double sum {t_ghost * 1e3:9.1f} ms  ratio to jvp total "
                f"{t_ghost / (t_g + t_jvp):5.1f}x  (rel. diff {err:.1e})"
            )


if __name__ == "__main__":
    app.run(main)
