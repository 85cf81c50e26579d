"""Where to take the addressing influence A(x, z) = <grad_w l(x), grad_w l(z)>: phi_t or theta_0?

    nice -n 10 python experiments/study_influence.py --root=/tmp/study/h --variant=p50_it20

On stage 1 of the harness's shared teacher, with a variant's phase-1 memory (`init/`) and its
refined memory (`memory/`), for one real minibatch:

- the mean per-row gradient norm of the memory rows under each point / label choice:
  phi_t with the soft labels (exactly zero: the labels are phi_t's own logits, so
  dBCE/dlogit = sigmoid(f(e)) - sigmoid(y~) = 0), phi_t after the rows are perturbed
  (embeddings + noise), phi_t after refinement, phi_t with the rows' hard labels (the real
  labels of the rows they came from), and a random theta_0 (the proxy at t = 1);
- Deficiency over the batch for each: its spread, and the overlap of the hard targets it picks
  with those picked at theta_0 (a random draw overlaps by hard_fraction on average).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import study_harness as H
from absl import app, flags, logging
from ml_collections import config_flags

from diet_jax import influence
from diet_jax.distill import driver
from diet_jax.distill import memory as memory_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_ROOT = flags.DEFINE_string("root", "/tmp/study/h", "Harness root.")
_VARIANT = flags.DEFINE_string("variant", "p50_it20", "Distilled variant (seed 0) to read.")
_ROWS = flags.DEFINE_integer("rows", 512, "Memory rows used (per-sample gradient norms).")


def main(_):
    logging.set_verbosity(logging.WARNING)
    sh = H.setup(_CONFIG.value, _ROOT.value)
    model, store = sh.ref.model, sh.store
    teacher = sh.ref.stage_state(1)
    stage = store.stages("historical")[0]
    root = driver.distill_root(os.path.join(sh.root, "variants", _VARIANT.value, "seed0"))
    init = memory_lib.load(os.path.join(driver.stage_dir(root, 1), "init"))
    refined = memory_lib.load(driver.memory_path(root, 1))
    n = min(_ROWS.value, len(init))
    take = np.arange(n)
    init, refined = memory_lib.take(init, take), memory_lib.take(refined, take)
    y_hard = jnp.asarray(np.asarray(stage.y_NxK)[np.asarray(init.row_N)], jnp.float32)
    batch = driver._real_batch(stage, 0, 1024, 1, {})
    e_real = model.embed(teacher.params["embed"], batch["x"])
    real = {"e": e_real, "y": batch["y"].astype(jnp.float32)}
    phi = teacher.params["dense"]
    theta0, state0 = model.init_dense(jax.random.key(1))
    key = jax.random.key(7)
    sigma = 0.01 * float(jnp.std(init.e_NxFxD))
    perturbed = {
        "e": init.e_NxFxD + sigma * jax.random.normal(key, init.e_NxFxD.shape),
        "y": jax.nn.sigmoid(init.logits_NxK),
    }
    cases = {
        "phi_t, soft labels": (phi, teacher.model_state, init.batch()),
        "phi_t, rows perturbed (1% std)": (phi, teacher.model_state, perturbed),
        "phi_t, refined rows": (phi, teacher.model_state, refined.batch()),
        "phi_t, hard labels": (phi, teacher.model_state, {"e": init.e_NxFxD, "y": y_hard}),
        "theta_0 (random), soft labels": (theta0, state0, init.batch()),
    }
    hard_k = int(round(0.1 * 1024))
    picks, lines = {}, []
    for name, (w, s, mem) in cases.items():
        loss_fn = influence.dense_loss(model, s)
        g = influence.per_sample_grads(loss_fn, w, mem)
        norms = jnp.sqrt(sum(jnp.sum(a.reshape(n, -1) ** 2, 1) for a in jax.tree.leaves(g)))
        d = influence.deficiency(loss_fn, loss_fn, w, real, mem)
        picks[name] = set(np.asarray(jax.lax.top_k(-d, hard_k)[1]).tolist())
        lines.append((name, float(jnp.mean(norms)), float(jnp.std(d)), float(jnp.mean(d == 0))))
    ref = picks["theta_0 (random), soft labels"]
    print(
        "| influence at | memory grad norm (mean) | Deficiency std | Deficiency == 0 "
        "| hard-target overlap with theta_0 |"
    )
    print("|---|---|---|---|---|")
    for name, gn, dstd, zero in lines:
        print(
            f"| {name} | {gn:.3g} | {dstd:.3g} | {zero:.2f} | {len(picks[name] & ref) / hard_k:.2f} |"
        )
    print(f"(memory rows {n}, real batch 1024, hard {hard_k}; random overlap ~0.10)")


if __name__ == "__main__":
    app.run(main)
