"""The command line around the modes: flag parsing that reports mistakes in one line, what must happen before
JAX starts (CPU compiler flags, the distributed runtime), resolving the settings, and exit statuses, one rule each:
0 finished; 1 failed (data, checkpoints, the workdir: a UserError prints its message alone; anything else is a bug
and shows its traceback); 2 the command line or the config is wrong (an unknown key, a value of the wrong type or
out of range, a config file that does not load: ConfigError, one line); 75 stopped before finishing, rerun the same
command to resume (SIGTERM, a lost host)."""
import asyncio
import logging
import os
import re
import sys
import threading
import traceback

import jax
from absl import flags
from absl import logging as absl_logging

from iblip_jax import checkpoints, distributed
from iblip_jax.errors import UserError
from iblip_jax.run import annotate, evaluate, export, predict, settings, summary, supervise, train


FAILURE_EXIT, USAGE_EXIT = 1, 2


class _Console(logging.Formatter):
  def format(self, record):
    text = record.getMessage()
    return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def _one_line_from_orbax(record: logging.LogRecord) -> bool:
  if "/orbax/" in record.pathname and record.exc_info:
    record.exc_info, record.exc_text = None, None
  return True


def _quiet_closed_loops(args) -> None:
  """A thread that dies on "Event loop is closed" is one of orbax's writers outliving a save that failed (the job
  reports the failure itself, in one line); every other thread's failure is printed as usual."""
  if not (isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value)):
    threading.__excepthook__(args)


_call_soon_threadsafe = asyncio.BaseEventLoop.call_soon_threadsafe


def _native_calls_on_closed_loops_drop(loop, callback, *args, **kwargs):
  """asyncio's call_soon_threadsafe, except that a call from native code (no Python caller) on a closed loop drops
  the callback without raising. Those calls are tensorstore's futures completing after a failed orbax save closed
  its event loop; the RuntimeError went to C++, which printed its traceback straight to file descriptor 2 (hundreds
  of lines by timing, past every Python hook) and dropped the callback anyway. The job reports the failed save itself,
  in one line; every Python caller still gets the error."""
  if loop.is_closed():
    try:
      sys._getframe(1)
    except ValueError:   # no Python frame below this one: called from native code
      logging.getLogger(__name__).debug("dropped %r: its event loop is closed", callback)
      return None
  return _call_soon_threadsafe(loop, callback, *args, **kwargs)


def console_logging() -> None:
  """The library logs through `logging` (iblip_jax.*); the job shows its INFO and above on stdout, plainly (absl's
  handler would put them on stderr behind a timestamp prefix, with INFO hidden); other libraries' INFO is hidden."""
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(_Console())
  logger = logging.getLogger("iblip_jax")
  logger.handlers[:] = [handler]
  logger.setLevel(logging.INFO)
  logger.propagate = False
  # asyncio's "Task exception was never retrieved": orbax's writer tasks, whose failure the job reports itself
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  for handler in logging.getLogger().handlers:   # absl's: orbax's own errors in one line, without their tracebacks
    handler.addFilter(_one_line_from_orbax)
  threading.excepthook = _quiet_closed_loops
  asyncio.BaseEventLoop.call_soon_threadsafe = _native_calls_on_closed_loops_drop
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
  modes = {"train": train.train_and_evaluate, "eval": evaluate.run, "predict": predict.run, "annotate": annotate.run,
           "export": export.run, "summary": summary.run}
  try:
    s = settings.resolve(config, workdir)
    return modes[s.mode](s)
  except train.Preempted as e:
    print(f"preempted: {e}; exit status {train.PREEMPTED_EXIT}: rerun the same command to resume", flush=True)
    sys.exit(train.PREEMPTED_EXIT)
  except settings.ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)
  except checkpoints.CheckpointWriteError as e:
    # orbax's writer threads still hold the failed save: at interpreter exit they would print hundreds of lines of
    # asyncio tracebacks over this one. The workdir lock is already released (the exception left its `with`).
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(FAILURE_EXIT)
  except UserError as e:  # the message says what to fix; a traceback would bury it
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(FAILURE_EXIT)
  except Exception as e:
    if jax.process_count() > 1 and supervise.lost_peer(str(e)):   # a collective failed because a peer is gone
      # at exit JAX's shutdown barrier would wait for the dead peer and then abort this process: leave now
      print(f"error: {supervise.message(str(e), workdir)}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(supervise.LOST_EXIT)
    raise


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
  missing config file, a config file that does not load) is one line on stderr and exit status 2, a usage error,
  instead of ml_collections' traceback."""
  try:
    args = flags.FLAGS(argv)
    if config_flag.value is not None:
      config_flag.value.get("mode")  # ml_collections reports an unreadable config file only when it is first used
    return args
  except flags.Error as e:  # a value of the wrong type, an unknown flag, a flag without a value
    cause = _config_cause(argv, e)   # or the config file's own failure, which absl's error quotes whole
    problem = _config_failed(argv, cause) if cause is not None else str(e).removeprefix("flag ")
  except (KeyError, AttributeError) as e:
    problem = _unknown_key(argv, e) or _config_failed(argv, e)
  except (TypeError, IndexError) as e:  # an override that goes on through a plain value: --config.mode.x=1
    problem = _config_failed(argv, e) if _config_frames(argv, e) else \
        f"a --config.<key> override goes through a value that has no keys: {e}"
  except OSError as e:
    problem = _unreadable_config(argv, e)
  except Exception as e:  # noqa: BLE001 - the config file itself fails: a syntax error, get_config() raising
    problem = _config_failed(argv, e)
  print(f"error: {problem}", file=sys.stderr)
  sys.exit(USAGE_EXIT)


def _config_spec(argv: list[str]) -> str:
  spec = next((value for name, value in zip(argv, argv[1:]) if name in ("--config", "-config")), None)
  return spec or next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")


def _config_frames(argv: list[str], error: BaseException) -> list:
  """The traceback's frames in the config file (its path without a config argument, configs/x.py:arg)."""
  path = os.path.abspath(_config_spec(argv).split(":", 1)[0])
  return [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == path]


def _config_cause(argv: list[str], error: BaseException) -> BaseException | None:
  """The exception in `error`'s chain raised inside the config file (absl and ml_collections re-raise it as their
  own), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if _config_frames(argv, error) or (isinstance(error, SyntaxError) and error.filename):
      return error
    error = error.__cause__ or error.__context__
  return None


def _config_failed(argv: list[str], error: BaseException) -> str:
  """'--config FILE: cannot load it: line N: ErrorType: message', the line being the config file's last one on the
  way to the error (for a syntax error, the line of the error)."""
  if isinstance(error, SyntaxError) and error.filename:
    where = f"line {error.lineno}: "
  else:
    frames = _config_frames(argv, error)
    where = f"line {frames[-1].lineno}: " if frames else ""
  message = str(error.msg if isinstance(error, SyntaxError) else error).strip().splitlines()
  return (f"--config {_config_spec(argv)}: cannot load it: {where}{type(error).__name__}"
          + (f": {message[0]}" if message else ""))


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
  spec = _config_spec(argv)
  if not os.path.exists(spec.split(":", 1)[0]):  # a config file may take an argument: configs/x.py:arg
    return f"--config {spec}: no such config file"
  cause = error.__cause__ or error  # ml_collections re-raises the loading error on first use
  return f"--config {spec}: cannot load it: {str(cause).strip().splitlines()[-1].strip()}"
