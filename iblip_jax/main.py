"""Entry point: `python -m iblip_jax.main --config configs/<name>.py [--config.x=...] [--workdir DIR]`.

Kept short on purpose; each mode's logic lives in an importable module.
"""
from absl import app, flags
from ml_collections import config_flags

from iblip_jax import summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")

MODES = {"summary": summary.run}


def main(argv):
  del argv
  config = _CONFIG.value
  if config.mode not in MODES:
    raise app.UsageError(f"--config.mode={config.mode!r} is not a mode of this version; "
                         f"available: {', '.join(sorted(MODES))}")
  MODES[config.mode](config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
