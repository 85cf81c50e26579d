"""Evaluate any candidate model on a finished run: `evaluate_candidate` and its command line.

    python -m diet_jax.candidate --workdir=runs/synthetic --config.model.name=dcnv2
    python -m diet_jax.candidate --workdir=runs/synthetic --module=my_pkg.models:MyNet \
        --module_kwargs='{"hidden": [64, 32]}' --method=diet,full_data

The candidate trains under the project's protocol (`evaluate.protocol.run_candidate`) on the
run's own stage store, final teacher and memories: DIET's distilled dataset (distilled.npz),
a selection baseline's rows (`<workdir>/baselines/<method>`), or the real stages (full_data,
cold_start, warmup_start, warm_full_data). Nothing is trained again but the candidate. With
`save=True` (the command line) the row goes into results.json and report.md (and its figure);
nothing else in the workdir is written.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
from absl import logging

from diet_jax import checkpoint, io_utils
from diet_jax import results as results_lib
from diet_jax.data import prepare
from diet_jax.data.store import StageStore
from diet_jax.distill import driver as distill_driver
from diet_jax.distill import export
from diet_jax.distill import memory as memory_lib
from diet_jax.evaluate import fidelity, methods, protocol, report
from diet_jax.models import factory
from diet_jax.train.reference import ReferenceRun, checkpoint_dir, teacher_root
from diet_jax.train.steps import make_trainer

# ------------------------------------------------------------------ configs


def _tuples(x):
    """JSON lists back to the tuples every config default uses (ConfigDict checks types)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was made with, from `<workdir>/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config.json in {workdir!r}: not a diet_jax run directory.")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`"configs/synthetic.py:tiny"` -> that file's get_config("tiny"), as `--config=` reads it."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config file {path!r}.")
    mod_spec = importlib.util.spec_from_file_location("diet_jax_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


# ------------------------------------------------------------------ a finished run's pieces

_CONTEXTS: dict = {}


def _context(workdir: str, config) -> dict:
    """Store, final teacher and its ReferenceRun for a finished run; cached per workdir, config
    and the teacher's and distilled file's modification times (a run made again is reloaded)."""
    root = prepare.store_root(config, workdir)
    if not StageStore.exists(root):
        raise FileNotFoundError(
            f"No stage store at {root!r}: {workdir!r} is not a finished run "
            "(run `python -m diet_jax.main` on it first)."
        )
    store = StageStore(root)
    fmap = store.feature_map
    names = [s.name for s in fmap.stages_with_role("historical")]
    troot = teacher_root(config, workdir)
    final = checkpoint_dir(troot, len(names))
    if not checkpoint.exists(final):
        raise FileNotFoundError(
            f"No final teacher checkpoint at {final!r}: {workdir!r} is not a finished run "
            "(run `python -m diet_jax.main` on it first)."
        )
    distilled = export.path_of(workdir)
    key = (
        os.path.abspath(workdir),
        config.to_json(),
        os.stat(final).st_mtime_ns,
        os.stat(distilled).st_mtime_ns if os.path.exists(distilled) else None,
    )
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    # The teacher's state as train_reference builds it: the template to restore into.
    model = factory.build_model(config.model, fmap, name=config.teacher.model)
    template = make_trainer(model, config.train).init(*model.init(jax.random.key(config.seed)))
    ref = ReferenceRun(model, template, names, troot, 0.0, 0, restored=names)
    ref.final = ref.stage_state(len(names))
    ctx = {"store": store, "ref": ref, "memories": {}}
    _CONTEXTS[key] = ctx
    return ctx


def _rows(method: str, workdir: str, config, ctx: dict) -> dict | None:
    """The rows a reduced-data method trains on; None for the methods on real stages."""
    if method not in methods.REDUCED:
        return None
    if method in ctx["memories"]:
        return ctx["memories"][method]
    ref = ctx["ref"]
    if method == "diet":
        if os.path.exists(export.path_of(workdir)) or not os.path.isdir(
            distill_driver.distill_root(workdir)
        ):
            d = export.load(workdir)
            sha = export.table_sha256(ref.final.params["embed"])
            if d.teacher_embed_sha256 != sha:
                raise ValueError(
                    f"{export.path_of(workdir)} belongs to another teacher "
                    f"({d.teacher_checkpoint}, table SHA-256 {d.teacher_embed_sha256[:12]}...) "
                    f"than the one at {checkpoint_dir(ref.root, len(ref.stage_names))} "
                    f"({sha[:12]}...): rerun the pipeline on {workdir!r}."
                )
            rows = d.rows()
        else:  # a run that predates distilled.npz: D_syn^T from its last stage checkpoint
            rows = distill_driver.load_final(workdir).trainable()
    else:
        path = os.path.join(workdir, "baselines", method)
        if memory_lib.exists(path):
            rows = memory_lib.load(path).trainable()
        else:  # not selected by the run: select now, in memory only (the workdir is untouched)
            logging.info("candidate: selecting %s rows (not saved: %s is absent)", method, path)
            rows = methods.selection_memory(method, config, ctx["store"], ref).trainable()
    ctx["memories"][method] = rows
    return rows


def _as_model(module, config, fmap, output: str, name: str | None) -> factory.RecModel:
    if module is None:  # a zoo backbone, with its hyperparameters from config.model
        return factory.build_model(config.model, fmap, name=name or config.model.name)
    if isinstance(module, factory.RecModel):
        return module
    if isinstance(module, str):
        module = factory.load_module(module)
    model = factory.from_module(module, config.model, fmap, output=output, name=name)
    if model.name in factory.BACKBONES:
        raise ValueError(
            f"A custom module may not be called {model.name!r}, a zoo backbone's name (its row "
            "would replace the zoo model's); pass name=..."
        )
    return model


# ------------------------------------------------------------------ the public function


def evaluate_candidate(
    workdir: str,
    module=None,
    *,
    method: str = "diet",
    output: str = "representation",
    name: str | None = None,
    config=None,
    seed: int | None = None,
    save: bool = False,
) -> dict:
    """Trains and tests one candidate on a finished run under `method`'s protocol.

    module: a flax module `module(e_BxFxD, train)` (see `models.factory.from_module` for the
        contract), a "package.module:Name" spec, a RecModel, or None for the zoo backbone
        `config.model.name` (or `name`).
    method: one of results.CANDIDATE_METHODS; "diet" trains on `<workdir>/distilled.npz`.
    output: "representation" (h_BxH into the shared MMoE head) or "logits" (logits_BxK).
    name: the row's model name (default: the module's class name, lowercased).
    config: default `<workdir>/config.json`; seed: default `config.seed` (as the pipeline).
    save: add the row to results.json (replacing one with the same method and model), its
        details to results.json's candidate_info, and rewrite report.md.

    Returns the row as results.json holds it ({"method", "model", "auc", "logloss",
    "per_task", "train_seconds", "train_samples"}).
    """
    if method not in results_lib.CANDIDATE_METHODS:
        raise ValueError(
            f"Unknown method {method!r}; expected one of {results_lib.CANDIDATE_METHODS}."
        )
    config = config_from_workdir(workdir) if config is None else config
    ctx = _context(workdir, config)
    store, ref = ctx["store"], ctx["ref"]
    model = _as_model(module, config, store.feature_map, output, name)
    rows = _rows(method, workdir, config, ctx)
    seed = config.seed if seed is None else int(seed)
    out = protocol.run_candidate(
        method,
        model,
        store,
        config,
        ref.final.params["embed"],
        rows,
        seed,
        embed_opt=protocol.inherited_embed_opt(ref.final, config),
    )
    row = results_lib.entry(method, model.name, out.metrics, out.train_seconds, out.train_samples)
    logging.info(
        "candidate %s / %s: test AUC %.4f (%.1fs)",
        method,
        model.name,
        row["auc"],
        row["train_seconds"],
    )
    if save:
        # Read again just before writing: the file may have changed since the context was built.
        res = results_lib.load_or_new(workdir)
        results_lib.upsert(res, row)
        res.setdefault("candidate_info", {})[f"{method}/{model.name}"] = out.info
        res["fidelity"] = fidelity.fidelity_table(res["results"])
        res["fidelity_ceiling"] = fidelity.noise_ceiling(res["results"])
        results_lib.save(workdir, res)
        report.write_report(workdir, res)
    return row


# ------------------------------------------------------------------ command line


def _workdir_from_argv(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _define_flags(config: ml_collections.ConfigDict):
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_dict(
        "config",
        config,
        "The run's config (config.json); override keys with --config.x=...",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "A finished run's directory.")
    flags.DEFINE_string("module", "", "A user module, 'package.module:Name' or 'file.py:Name'.")
    flags.DEFINE_string("module_kwargs", "{}", "JSON object of the module's constructor args.")
    flags.DEFINE_enum("output", "representation", factory.OUTPUTS, "What the module returns.")
    flags.DEFINE_string("name", "", "The row's model name (default: the module's class name).")
    flags.DEFINE_list(
        "method", ["diet"], f"Methods, comma-separated: {results_lib.CANDIDATE_METHODS}."
    )
    flags.DEFINE_integer("seed", None, "Seed of the candidate (default: config.seed).")
    flags.mark_flags_as_required(["workdir"])


def _main(argv) -> None:
    import logging as std_logging

    from absl import flags

    class _QuietOrbax(std_logging.Filter):  # as diet_jax.main: Orbax logs every file at INFO
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"Too many command-line arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietOrbax())
    io_utils.enable_compilation_cache()
    try:
        kwargs = json.loads(f.module_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError
    except ValueError:
        _fail(f"--module_kwargs must be a JSON object, got {f.module_kwargs!r}.")
    try:
        module = factory.load_module(f.module, kwargs) if f.module else None
        start = time.perf_counter()
        for method in f.method:
            t0 = time.perf_counter()
            row = evaluate_candidate(
                f.workdir,
                module,
                method=method,
                output=f.output,
                name=f.name or None,
                config=f.config,
                seed=f.seed,
                save=True,
            )
            print(json.dumps({**row, "wall_seconds": round(time.perf_counter() - t0, 2)}))
        print(
            f"added {len(f.method)} row(s) to {os.path.join(f.workdir, results_lib.FILENAME)} "
            f"in {time.perf_counter() - start:.1f}s"
        )
    except (ValueError, FileNotFoundError, TypeError) as e:
        _fail(str(e))


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    from absl import app

    workdir = _workdir_from_argv(sys.argv[1:])
    config = ml_collections.ConfigDict()
    if workdir is not None:
        try:
            config = config_from_workdir(workdir)
        except FileNotFoundError as e:
            _fail(str(e))
    _define_flags(config)
    app.run(_main)


if __name__ == "__main__":
    main()
