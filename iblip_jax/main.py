"""Entry point: `python -m iblip_jax.main --config configs/<name>.py [--config.x=...] [--workdir DIR]`.

Modes (--config.mode): train (with periodic evaluation; resumes from --workdir), eval, predict, export, summary.
Kept short on purpose; each mode's logic lives in an importable module.
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")


def _modes():
  from iblip_jax import summary
  from iblip_jax.run import evaluate, export, predict, train
  return {"train": train.train_and_evaluate, "eval": evaluate.run, "predict": predict.run,
          "export": export.run, "summary": summary.run}


def main(argv):
  del argv
  # Before anything else touches JAX: on a pod, jax.distributed.initialize refuses to start once a backend exists.
  from iblip_jax import distributed
  distributed.maybe_initialize()
  config = _CONFIG.value
  modes = _modes()
  if config.mode not in modes:
    raise app.UsageError(f"--config.mode={config.mode!r} is not a mode; available: {', '.join(sorted(modes))}")
  try:
    modes[config.mode](config, _WORKDIR.value)
  except ValueError as e:  # config and input errors: the message says what to fix, a traceback would bury it
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
