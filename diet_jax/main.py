"""Entry point: `python -m diet_jax.main --config=configs/synthetic.py --workdir=DIR`.

Kept thin on purpose: flags and config here, the pipeline in `diet_jax.pipeline`.
"""

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diet_jax import pipeline
from diet_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/synthetic.py or configs/synthetic.py:tiny.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run writes its artifacts; a rerun resumes there."
)


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep the run's own INFO lines readable."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Compiled steps are cached on disk, so a rerun (or a resumed run) skips most compilation.
    cache = os.environ.get("DIET_JAX_CACHE", os.path.expanduser("~/.cache/diet_jax_jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:  # the user's to fix: the message alone, exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
