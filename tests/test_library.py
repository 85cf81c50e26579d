"""The library surface: public names, distilled.npz, user modules, evaluate_candidate, its CLI,
TensorBoard files."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import diet_jax
from diet_jax.data.store import FeatureMap
from diet_jax.distill import driver, export
from diet_jax.models import factory
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": ROOT}


class Flat(nn.Module):
    """A user module: an MLP on the flattened field embeddings."""

    width: int = 6

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        return nn.Dense(self.width)(e_BxFxD.reshape(e_BxFxD.shape[0], -1))


class PerField(nn.Module):
    """Forgets to flatten: returns [B, F, 4]."""

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        return nn.Dense(4)(e_BxFxD)


def _fmap(tasks=("click", "like", "buy")):
    return FeatureMap("toy", tuple("abcdefgh"), (5,) * 8, tasks, ())


def test_public_names_import_lazily():
    assert "evaluate_candidate" in diet_jax.__all__ and "load_distilled" in diet_jax.__all__
    for name in diet_jax.__all__:
        assert getattr(diet_jax, name) is not None, name
    assert diet_jax.load_distilled is export.load and diet_jax.from_module is factory.from_module
    # `import diet_jax` alone loads neither JAX nor flax.
    code = "import sys, diet_jax; print(sorted({'jax', 'flax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diet_jax.nope  # noqa: B018


def test_user_module_wrapper_and_wrong_shapes(tiny_config):
    fmap = _fmap()
    model = factory.from_module(Flat(), tiny_config.model, fmap)
    assert model.name == "flat" and set(model.init_dense(jax_key())[0]) == {"backbone", "head"}
    params, state = model.init(jax_key())
    assert model.apply(params, state, jnp.zeros((5, 8), jnp.int32))[0].shape == (5, 3)
    as_logits = factory.from_module(Flat(width=3), tiny_config.model, fmap, output="logits")
    assert set(as_logits.init_dense(jax_key())[0]) == {"module"}  # no MMoE head
    with pytest.raises(ValueError, match=r"h_BxH of shape \(2, H\).*returned shape \(2, 8, 4\)"):
        factory.from_module(PerField(), tiny_config.model, fmap)
    with pytest.raises(ValueError, match=r"logits_BxK of shape \(2, 3\).*returned shape \(2, 6\)"):
        factory.from_module(Flat(), tiny_config.model, fmap, output="logits")
    with pytest.raises(ValueError, match="output must be one of"):
        factory.from_module(Flat(), tiny_config.model, fmap, output="probs")


def test_load_module_specs(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "import flax.linen as nn\n"
        "class Net(nn.Module):\n"
        "    hidden: tuple = (4,)\n"
        "    @nn.compact\n"
        "    def __call__(self, e, train=False):\n"
        "        return nn.Dense(self.hidden[-1])(e.reshape(e.shape[0], -1))\n"
    )
    net = factory.load_module(f"{path}:Net", {"hidden": [3, 2]})
    assert type(net).__name__ == "Net" and net.hidden == (3, 2)  # JSON lists become tuples
    assert type(factory.load_module("tests.test_library:Flat")).__name__ == "Flat"
    for spec, msg in [
        ("Flat", "looks like"),
        (f"{path}:Missing", "no attribute 'Missing'"),
        ("no_such_pkg.mod:Net", "cannot import"),
    ]:
        with pytest.raises(ValueError, match=msg):
            factory.load_module(spec)


def test_proxy_module_keys_are_checked(tiny_config):
    dc = tiny_config.distill
    assert dc.proxy_module == "" and factory.proxy_from_config(tiny_config, _fmap()) is None
    dc.proxy_module = "tests.test_library:Flat"
    proxy = factory.proxy_from_config(tiny_config, _fmap())
    assert proxy.name == "flat" and set(proxy.init_dense(jax_key())[0]) == {"backbone", "head"}
    dc.influence_at = "teacher"
    with pytest.raises(ValueError, match="influence_at must be 'proxy'"):
        factory.proxy_from_config(tiny_config, _fmap())
    dc.influence_at, dc.proxy_output = "proxy", "probabilities"
    with pytest.raises(ValueError, match="config.distill.proxy_output must be one of"):
        factory.check_proxy_config(dc)


def _toy_distilled(n=5, f=8, d=4, k=3, **changes):
    rng = np.random.default_rng(0)
    base = export.Distilled(
        e_NxFxD=rng.normal(size=(n, f, d)).astype(np.float32),
        logits_NxK=rng.normal(size=(n, k)).astype(np.float32),
        origin_N=np.array([1, 1, 2, 3, 3][:n], np.int32),
        row_N=np.arange(n, dtype=np.int32),
        stage_names=("stage_1", "stage_2", "stage_3"),
        fields=tuple("abcdefgh"[:f]),
        tasks=("click", "like", "buy")[:k],
        vocab_sizes=(5,) * f,
        dataset="toy",
        ratio=0.1,
        teacher_checkpoint="teacher/stage_03",
        teacher_stage=3,
        teacher_embed_sha256="0" * 64,
    )
    return dataclasses.replace(base, **changes)


def test_distilled_file_round_trips_and_rejects_bad_files(tmp_path):
    d = _toy_distilled()
    path = export.save(str(tmp_path / export.FILENAME), d)
    back = diet_jax.load_distilled(str(tmp_path))  # a workdir or the file itself
    for field in dataclasses.fields(export.Distilled):
        a, b = getattr(d, field.name), getattr(back, field.name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field.name)
    assert list(back.origin_names_N) == ["stage_1", "stage_1", "stage_2", "stage_3", "stage_3"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]

    def rewrite(**keys):
        z = dict(np.load(path))
        z.update(keys)
        np.savez(path, **z)

    rewrite(format_version=np.asarray(99))
    with pytest.raises(ValueError, match="format_version 99; this diet_jax reads version 1"):
        export.load(path)
    rewrite(format_version=np.asarray(1), logits_NxK=np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match=r"logits_NxK has shape \(5, 2\), expected \(5, 3\)"):
        export.load(path)
    rewrite(logits_NxK=np.zeros((5, 3), np.float32), origin_N=np.full(5, 4, np.int32))
    with pytest.raises(ValueError, match="origin_N must lie in 1..3"):
        export.load(path)
    with pytest.raises(FileNotFoundError, match="No distilled dataset"):
        export.load(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="e_NxFxD has"):
        export.save(
            str(tmp_path / "x.npz"), _toy_distilled(fields=tuple("abc"), vocab_sizes=(5,) * 3)
        )


def test_pipeline_writes_the_distilled_dataset(tiny_run):
    workdir, res = tiny_run
    d = diet_jax.load_distilled(workdir)
    final = driver.load_final(workdir)
    np.testing.assert_array_equal(d.e_NxFxD, np.asarray(final.e_NxFxD))
    np.testing.assert_array_equal(d.logits_NxK, np.asarray(final.logits_NxK))
    np.testing.assert_array_equal(d.origin_N, np.asarray(final.origin_N))
    assert d.fields == ("user", "item", "category", "shop", "brand", "city", "age", "device")
    assert d.tasks == ("click", "like", "buy") and d.stage_names == (
        "stage_1",
        "stage_2",
        "stage_3",
    )
    assert d.teacher_checkpoint == os.path.join("teacher", "stage_03") and d.teacher_stage == 3
    assert set(np.unique(d.origin_N)) <= {1, 2, 3} and len(np.unique(d.origin_N)) > 1  # fusion
    from diet_jax.candidate import _context, config_from_workdir

    ref = _context(workdir, config_from_workdir(workdir))["ref"]
    assert d.teacher_embed_sha256 == export.table_sha256(ref.final.params["embed"])


def test_candidate_reproduces_the_pipelines_row(tiny_run):
    workdir, res = tiny_run
    before = open(os.path.join(workdir, "results.json")).read()
    row = diet_jax.evaluate_candidate(workdir, method="diet", name="dcn")  # the zoo's DCN
    want = next(r for r in res["results"] if (r["method"], r["model"]) == ("diet", "dcn"))
    # The contract's keys (results.entry); the pipeline's rows add seed aggregates on top.
    assert set(row) <= set(want) and row["model"] == "dcn"
    assert row["auc"] == pytest.approx(want["auc"], abs=1e-6)
    assert row["train_samples"] == want["train_samples"]
    assert open(os.path.join(workdir, "results.json")).read() == before  # save=False
    with pytest.raises(ValueError, match="zoo backbone's name"):
        diet_jax.evaluate_candidate(workdir, Flat(), name="dcn")
    with pytest.raises(ValueError, match="Unknown method 'best'"):
        diet_jax.evaluate_candidate(workdir, Flat(), method="best")


def test_distilled_file_of_another_teacher_is_refused(tiny_run, tmp_path):
    from diet_jax.candidate import config_from_workdir

    workdir, _ = tiny_run
    config = config_from_workdir(workdir)  # the shared run's store and teacher, another file
    config.data.store_dir = os.path.join(workdir, "data")
    config.teacher.checkpoint_dir = os.path.join(workdir, "teacher")
    other = dataclasses.replace(export.load(workdir), teacher_embed_sha256="f" * 64)
    export.save(str(tmp_path / export.FILENAME), other)
    with pytest.raises(ValueError, match="belongs to another teacher"):
        diet_jax.evaluate_candidate(str(tmp_path), Flat(), config=config)


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size)
    return out


def test_cli_adds_one_row_and_changes_nothing_else(tiny_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], workdir)  # the shared run stays as it is
    before = _snapshot(workdir)
    rows_before = json.load(open(os.path.join(workdir, "results.json")))["results"]
    cmd = [sys.executable, "-m", "diet_jax.candidate", f"--workdir={workdir}"]
    bad = subprocess.run(
        cmd + ["--config.evaluate.max_epoch=2"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert bad.returncode != 0 and 'Did you mean "max_epochs"' in bad.stderr
    ok = subprocess.run(
        cmd
        + [
            "--module=examples/custom_model.py:DeepFM",
            '--module_kwargs={"hidden": [8]}',
            "--method=diet",
            "--config.evaluate.max_epochs=2",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["results"][:-1] == rows_before
    new = res["results"][-1]
    assert (new["method"], new["model"]) == ("diet", "deepfm") and 0.5 < new["auc"] < 1
    assert json.loads(ok.stdout.splitlines()[0])["auc"] == new["auc"]
    assert res["candidate_info"]["diet/deepfm"]["best_epoch"] in (0, 1)
    assert "deepfm" in open(os.path.join(workdir, "report.md")).read()
    after = _snapshot(workdir)
    report_files = {"results.json", "report.md", "figure1.png", "figure1_reduced_vs_full.png"}
    assert set(after) == set(before)
    changed = {p for p in after if after[p] != before[p]}
    assert changed - report_files == set() and {"results.json", "report.md"} <= changed


def test_tensorboard_event_files(tiny_run):
    from diet_jax import metric_writers

    workdir, _ = tiny_run
    scalars = metric_writers.read_scalars(os.path.join(workdir, metric_writers.DIRNAME))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    for stage in ("stage_1", "stage_2", "stage_3"):
        assert f"teacher/{stage}/loss" in scalars
        meta = scalars[f"distill/{stage}/meta_loss"]
        assert len(meta) >= 2 and all(np.isfinite(v) for _, v in meta)
        # Hard-target AUC: every logged value (null when no task had both classes) is there.
        hard = [
            (x["iteration"], x["hard_auc"])
            for x in lines
            if x["phase"] == "distill" and x["stage"] == stage and x["hard_auc"] is not None
        ]
        got = scalars.get(f"distill/{stage}/hard_auc", [])[: len(hard)]
        assert [k for k, _ in got] == [k for k, _ in hard]
        assert [v for _, v in got] == pytest.approx([v for _, v in hard], rel=1e-6)
    assert any(scalars.get(f"distill/stage_{t}/hard_auc") for t in (1, 2, 3))
    assert [s for s, _ in scalars["teacher_stage/val_auc"]][:3] == [1, 2, 3]
    assert "candidate/diet/dcn/auc" in scalars and "reference_eval/test/auc" in scalars
    # The jsonl and the event files hold the same numbers.
    aucs = [
        x["auc"]
        for x in lines
        if x["phase"] == "candidate" and (x["method"], x["model"]) == ("diet", "dcn")
    ]
    assert scalars["candidate/diet/dcn/auc"][0][1] == pytest.approx(aucs[0], rel=1e-6)


def jax_key():
    import jax

    return jax.random.key(0)
