"""Entry point: `python -m diet_jax.main --config=configs/synthetic.py --workdir=DIR`.

Kept thin on purpose: flags and config here, the pipeline in `diet_jax.pipeline`.

Exit status: 0 done, 2 a user error (unknown key, bad value, missing or malformed data: one line
on stderr, no traceback), anything else a bug in diet_jax (with its traceback).
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diet_jax import io_utils, pipeline
from diet_jax.errors import UserError, one_line

USER_ERROR = 2

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
    """Keeps the run's own INFO lines readable.

    Orbax logs every file it writes at INFO, and JAX logs at INFO each platform it probes and
    does not find (`Unable to initialize backend 'tpu'` on every machine without a TPU). Warnings
    and errors always pass; if no backend at all starts, JAX raises an error of its own.
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        if "orbax" in record.pathname:
            return False
        return not (
            record.name.startswith("jax")
            and str(record.msg).startswith("Unable to initialize backend")
        )


def _fail(message: str) -> None:
    sys.stderr.write(f"diet_jax: error: {message}\n")
    sys.exit(USER_ERROR)


def _user_error_in(err: BaseException) -> UserError | None:
    """The innermost UserError of an exception chain (config_flags re-wraps what configs raise)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            found = err
        err = err.__cause__ or err.__context__
    return found


def _unknown_key_message(err: LookupError | AttributeError, argv: list[str]) -> str:
    """ml_collections' KeyError for a key that does not exist, with the flag that named it."""
    inner = err.args[0] if err.args and isinstance(err.args[0], KeyError) else err
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    flag = next(
        (
            a.split("=", 1)[0]
            for a in argv
            if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")
        ),
        "--config",
    )
    return f"{flag}: no such config key {key!r}." + (f" {' '.join(hint.split())}" if hint else "")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with user errors as one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        user = _user_error_in(e)
        if user is not None:  # raised by a config file (e.g. an unknown variant)
            _fail(one_line(user))
        if "Traceback" in str(e):  # a config file failed: our bug, so show where
            sys.stderr.write(f"FATAL Flags parsing error:\n{e}\n")
            sys.exit(1)
        _fail(one_line(e))  # a value that does not parse, a missing or unknown flag
    except (KeyError, AttributeError) as e:  # an override of a key the config lacks
        _fail(_unknown_key_message(e, argv))
    except OSError as e:  # the config file cannot be read (seen while applying an override)
        _fail_unreadable_config(e)


def _fail_unreadable_config(err: OSError) -> None:
    cause = str(err.__cause__ or err).strip().splitlines()[-1].strip()
    path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    _fail(f"--config={path}: cannot load the config file: {cause}")


def _config():
    """The parsed config; a config file that cannot be read fails here, on first access."""
    config = _CONFIG.value
    try:
        config.keys()
    except OSError as e:
        _fail_unreadable_config(e)
    return config


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every setting is a flag (--config.<key>=...)")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    io_utils.enable_compilation_cache()  # a rerun (or a resumed run) compiles almost nothing
    try:
        pipeline.run(_config(), _WORKDIR.value)
    except UserError as e:
        _fail(one_line(e))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
