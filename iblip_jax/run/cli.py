"""The command line around the modes: flag parsing that reports mistakes in one line, what must happen before
JAX starts (CPU compiler flags, the distributed runtime), resolving the settings, and exit statuses:
0 finished, 1 failed (a UserError prints its message alone; anything else is a bug and shows its traceback),
2 a command-line mistake, 75 preempted (SIGTERM after a checkpoint: rerun to resume)."""
import logging
import os
import re
import sys

import jax
from absl import flags
from absl import logging as absl_logging

from iblip_jax import distributed
from iblip_jax.errors import UserError
from iblip_jax.run import evaluate, export, predict, settings, summary, train


class _Console(logging.Formatter):
  def format(self, record):
    text = record.getMessage()
    return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def console_logging() -> None:
  """The library logs through `logging` (iblip_jax.*); the job shows its INFO and above on stdout, plainly (absl's
  handler would put them on stderr behind a timestamp prefix, with INFO hidden); other libraries' INFO is hidden."""
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(_Console())
  logger = logging.getLogger("iblip_jax")
  logger.handlers[:] = [handler]
  logger.setLevel(logging.INFO)
  logger.propagate = False
  # orbax and grain log every checkpoint's internals at INFO through absl (dozens of lines a save): a console shows
  # progress, results and real warnings only (--verbosity=0 brings them back)
  if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def before_jax(config) -> None:
  """What has to happen before anything touches JAX's backends, in every mode: on a pod, jax.distributed.initialize
  refuses to start once a backend exists, and XLA reads its flags when the backend starts."""
  console_logging()
  distributed.default_platform()
  _cpu_compiler_flags(config)
  distributed.maybe_initialize()
  _warn_cpu_bf16(config)


def run(config, workdir: str | None):
  """Resolves the settings and runs the mode; turns the outcome into the exit statuses above."""
  modes = {"train": train.train_and_evaluate, "eval": evaluate.run, "predict": predict.run, "export": export.run,
           "summary": summary.run}
  try:
    s = settings.resolve(config, workdir)
    return modes[s.mode](s)
  except train.Preempted as e:
    print(f"preempted: {e}; exit status {train.PREEMPTED_EXIT}: rerun the same command to resume", flush=True)
    sys.exit(train.PREEMPTED_EXIT)
  except UserError as e:  # the message says what to fix; a traceback would bury it
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


# XLA's CPU compiler computes bfloat16 matmuls in float32 and hoists the float32 copies of the scanned layers'
# stacked weights out of the layer loops: a real-size bf16 checkpoint then needs ~2.6x its size in host memory
# (measured with tools/bench_load.py; 1.4x without the hoisting). The flag has to be set before the backend starts.
CPU_BF16_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _bf16(config) -> bool:
  return "bfloat16" in (config.model.vision.get("dtype"), config.model.text.get("dtype"))


def _cpu_compiler_flags(config) -> None:
  """Switches that hoisting off when the job is told to run on CPU (JAX_PLATFORMS=cpu) with bfloat16 towers (TPU
  and GPU compute in bfloat16 and keep the optimisation). Runs before the backend starts."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if _bf16(config) and CPU_BF16_FLAG not in flags_now and os.environ.get("JAX_PLATFORMS", "").split(",") == ["cpu"]:
    os.environ["XLA_FLAGS"] = f"{flags_now} {CPU_BF16_FLAG}".strip()


def _warn_cpu_bf16(config) -> None:
  """On a CPU backend nobody asked for by name, the flag could not be set in time: say how."""
  if _bf16(config) and CPU_BF16_FLAG not in os.environ.get("XLA_FLAGS", "") and jax.default_backend() == "cpu":
    print(f"WARNING: bfloat16 towers on CPU: set JAX_PLATFORMS=cpu (or XLA_FLAGS={CPU_BF16_FLAG}); without it "
          "real-size weights need ~2.6x their size in host memory", file=sys.stderr, flush=True)


def parse_flags(argv: list[str], config_flag) -> list[str]:
  """absl's flag parsing, but a mistake on the command line (an unknown --config.key, a value of the wrong type, a
  missing config file) is one line on stderr and exit status 2, a usage error, instead of ml_collections' traceback."""
  try:
    args = flags.FLAGS(argv)
    if config_flag.value is not None:
      config_flag.value.get("mode")  # ml_collections reports an unreadable config file only when it is first used
    return args
  except flags.Error as e:  # a value of the wrong type, an unknown flag, a flag without a value
    problem = str(e).removeprefix("flag ")
  except (KeyError, AttributeError) as e:
    problem = _unknown_key(argv, e)
    if problem is None:  # no override names that key: a bug in the config file, whose traceback says where
      raise
  except (TypeError, IndexError) as e:  # an override that goes on through a plain value: --config.mode.x=1
    problem = f"a --config.<key> override goes through a value that has no keys: {e}"
  except OSError as e:
    problem = _unreadable_config(argv, e)
  print(f"error: {problem}", file=sys.stderr)
  sys.exit(2)


def _overrides(argv: list[str]) -> list[str]:
  """The key paths of the --config.<path>[=value] arguments, as ml_collections reads them (flag files expanded)."""
  argv = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  return [m.group(1) for m in (re.match(r"--?(?:no)?config\.([^=]+)", arg) for arg in argv) if m]


def _unknown_key(argv: list[str], error: Exception) -> str | None:
  """'--config.a.b: no such config key 'b' in a (did you mean c?)' from ml_collections' KeyError; None if no
  override has that key."""
  text = error
  while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean ..."))
    text = text.args[0] if text.args else ""
  first, _, rest = str(text).partition("\n")
  key, hint = first.strip("'\""), re.search(r'Did you mean "(.+?)"', rest)
  for path in _overrides(argv):
    parts = [p for p in re.split(r"[.\[\]]", path) if p]
    if key in parts:
      where = ".".join(parts[:parts.index(key)])
      return (f"--config.{path}: no such config key {key!r}" + (f" in {where}" if where else "")
              + (f" (did you mean {hint.group(1)}?)" if hint else ""))
  return None


def _unreadable_config(argv: list[str], error: OSError) -> str:
  spec = next((value for name, value in zip(argv, argv[1:]) if name in ("--config", "-config")), None)
  spec = spec or next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")
  if not os.path.exists(spec.split(":", 1)[0]):  # a config file may take an argument: configs/x.py:arg
    return f"--config {spec}: no such config file"
  cause = error.__cause__ or error  # ml_collections re-raises the loading error on first use
  return f"--config {spec}: cannot load it: {str(cause).strip().splitlines()[-1].strip()}"
