"""CI runs the example and the quickstart notebook on :tiny, so neither can rot."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_custom_model_example(tiny_run, tmp_path):
    shared, _ = tiny_run  # its stage store and teacher are reused (read only): the example's
    workdir = tmp_path / "custom"  # own work is distillation with DeepFM, and the candidates
    cmd = [
        sys.executable,
        "examples/custom_model.py",
        "--config=configs/synthetic.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.store_dir={shared}/data",
        f"--config.teacher.checkpoint_dir={shared}/teacher",
        "--config.evaluate.models=('dcn',)",
        "--config.evaluate.methods=('full_data','diet')",
        "--methods=full_data,diet",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.load(open(workdir / "config.json"))
    assert config["distill"]["proxy_module"].endswith("examples/custom_model.py:DeepFM")
    res = json.load(open(workdir / "results.json"))
    rows = {(r["method"], r["model"]): r for r in res["results"]}
    for method in ("full_data", "diet"):
        assert 0.5 < rows[(method, "deepfm")]["auc"] < 1, method
        assert (method, "dcn") in rows
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert {x["stage"] for x in lines if x["phase"] == "distill_stage"} == {
        "stage_1",
        "stage_2",
        "stage_3",
    }
    table = [line for line in out.stdout.splitlines() if line.startswith("| Method")]
    assert table and "deepfm AUC" in table[0] and "dcn AUC" in table[0]


def test_quickstart_notebook(tiny_run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workdir = str(tmp_path / "quickstart")
    shutil.copytree(tiny_run[0], workdir)  # a finished :tiny run: the pipeline cell resumes
    monkeypatch.setenv("DIET_QUICKSTART_WORKDIR", workdir)
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the kernel imports this checkout's diet_jax
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()
    text = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}))
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "tinyautoint / diet: test AUC" in text and "image/png" in text
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert {("full_data", "tinyautoint"), ("diet", "tinyautoint")} <= {
        (r["method"], r["model"]) for r in res["results"]
    }
