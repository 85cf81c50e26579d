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

"score" columns exclude the shared G_syn pass; "total" includes it. Model: the config's
teacher (DCN + MMoE by default), dense parameters only, float32, jitted, median of --repeats
calls after a warm-up call (compilation excluded).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax import influence
from diet_jax.data.store import FeatureMap
from diet_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_SIZES = flags.DEFINE_list("sizes", ["1024", "4096"], "Real batch sizes (memory of the same size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path (the median is printed).")
_VMAP_CHUNK = flags.DEFINE_integer("vmap_chunk", 256, "Samples per chunk of per-sample gradients.")
_GHOST_MAX = flags.DEFINE_integer("ghost_max", 1024, "Largest batch for the ghost double sum.")
_JVP_CHUNK = flags.DEFINE_integer("jvp_chunk", 1024, "Rows per chunk of the G_syn pass and jvp.")


def timed(fn, *args, repeats: int) -> tuple[float, jax.Array]:
    out = jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


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
        if size <= _GHOST_MAX.value:
            t_ghost, d_ghost = timed(ghost_total, params, real, syn, repeats=r)
            err = float(jnp.linalg.norm(d_ghost - d_vmap) / jnp.linalg.norm(d_vmap))
            print(
                f"  ghost double sum {t_ghost * 1e3:9.1f} ms  ratio to jvp total "
                f"{t_ghost / (t_g + t_jvp):5.1f}x  (rel. diff {err:.1e})"
            )


if __name__ == "__main__":
    app.run(main)
