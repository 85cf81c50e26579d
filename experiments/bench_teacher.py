"""Teacher training throughput: samples/s and step time on whatever device JAX finds.

    python experiments/bench_teacher.py --config=configs/synthetic.py [--workdir=/tmp/bench] [--steps=100]
    python experiments/bench_teacher.py --config=configs/synthetic.py --loader_only

Times the jitted, donating train step of the reference model over real batches of the first
historical stage, fed by the same loader as training, after a warm-up that compiles it.
`--loader_only`: the loader alone (batches gathered from the memmaps and put on the device, no
step), the rate that bounds one pass over the store on an accelerator (bench_scale.py
`--loader_samples_per_s`).
"""

import os
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data import loader, prepare
from diet_jax.models import build_model
from diet_jax.train.steps import make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the stage store is (or is written); a temp dir if unset."
)
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps (compilation).")
_LOADER_ONLY = flags.DEFINE_bool("loader_only", False, "Time the loader alone, no train step.")


def main(_):
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), "diet_bench_teacher")
    store = prepare.prepare(config, workdir)
    stage = store.stages("historical")[0]
    model = build_model(config.model, store.feature_map, name=config.teacher.model)
    trainer = make_trainer(
        model, config.train
    )  # train.embedding_optimizer decides the table's update
    params, model_state = model.init(jax.random.key(0))
    state = trainer.init(params, model_state)
    step = trainer.step
    bs = config.train.batch_size
    needed = _WARMUP.value + _STEPS.value
    epochs = range(-(-needed * bs // len(stage)) + 1)
    batches = (
        b for e in epochs for b in loader.device_batches(stage, bs, shuffle=True, seed=0, epoch=e)
    )

    if _LOADER_ONLY.value:
        for _ in range(_WARMUP.value):
            next(batches)
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            jax.block_until_ready(next(batches))
        seconds = time.perf_counter() - start
        print(
            f"loader alone, batch {bs}: {_STEPS.value * bs / seconds:,.0f} samples/s "
            f"({1e3 * seconds / _STEPS.value:.2f} ms/batch, {len(store.feature_map.fields)} fields)"
        )
        return
    for _ in range(_WARMUP.value):
        state, m = step(state, next(batches))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, m = step(state, next(batches))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"embedding optimizer: {config.train.embedding_optimizer}")
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: {config.teacher.model}  params: {n_params:,}"
    )
    print(
        f"batch {bs}: {_STEPS.value * bs / seconds:,.0f} samples/s, {1e3 * seconds / _STEPS.value:.2f} ms/step (loader included)"
    )


if __name__ == "__main__":
    app.run(main)
