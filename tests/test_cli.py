"""The command line: a user error prints one line on stderr and exits with status 2, before work.

Each case is a subprocess that stops early (a few seconds: the imports, no training).
"""

import os
import re
import subprocess
import sys

from conftest import ROOT

from diet_jax import main


def _run(tmp_path, *args, config="configs/synthetic.py:tiny"):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "diet_jax.main", f"--config={config}", f"--workdir={workdir}"]
        + list(args),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, workdir


def _one_line_error(done) -> str:
    assert done.returncode == main.USER_ERROR, done.stderr[-3000:]
    # The run's own "phase: <name>" progress lines (absl INFO, see pipeline._phase) may come
    # before the error; nothing else may: no traceback, no library INFO lines.
    lines = [ln for ln in done.stderr.splitlines() if not re.search(r"\] phase: \w+$", ln)]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("diet_jax: error: ")
    return lines[0]


def test_unknown_key_says_did_you_mean_on_one_line(tmp_path):
    done, workdir = _run(tmp_path, "--config.train.batchsize=3")
    line = _one_line_error(done)
    assert line.endswith(
        "--config.train.batchsize: no such config key 'batchsize'. Did you mean \"batch_size\" "
        'instead of "batchsize"?'
    )
    assert "\\n" not in line and not workdir.exists()


def test_value_that_does_not_parse(tmp_path):
    done, workdir = _run(tmp_path, "--config.train.batch_size=abc")
    line = _one_line_error(done)
    assert "--config.train.batch_size=abc: invalid literal for int()" in line
    assert not workdir.exists()


def test_bad_model_name_fails_before_any_work(tmp_path):
    done, workdir = _run(tmp_path, "--config.evaluate.models=('dcn','resnet')")
    line = _one_line_error(done)
    assert "config.evaluate.models has unknown name(s) ['resnet']" in line
    assert not workdir.exists()  # no data, no teacher, not even config.json


def test_missing_data_dir_names_the_file(tmp_path):
    done, _ = _run(
        tmp_path, f"--config.data.data_dir={tmp_path / 'nowhere'}", config="configs/taobao.py:tiny"
    )
    line = _one_line_error(done)
    assert f"raw file 'UserBehavior.csv' is missing (looked for {tmp_path / 'nowhere'}" in line


def test_error_after_jax_starts_has_no_backend_info_line(tmp_path):
    """The mesh needs the devices, so JAX has probed its platforms (TPU included) by then."""
    done, _ = _run(
        tmp_path, "--config.parallel.enabled=True", "--config.parallel.data_axis_size=99"
    )
    line = _one_line_error(done)
    assert "config.parallel.data_axis_size must lie in" in line
    assert "Unable to initialize backend" not in done.stderr
