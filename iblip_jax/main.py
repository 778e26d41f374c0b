"""Entry point: `python -m iblip_jax.main --config configs/<name>.py [--config.x=...] [--workdir DIR]`.

Modes (--config.mode): train (with periodic evaluation; resumes from --workdir), eval, predict, export, summary.
Kept short on purpose: the command line's rules live in iblip_jax/run/cli.py, each mode in its own module.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from iblip_jax.run import cli, supervise

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (local or gs://).")


def main(argv):
  del argv
  cli.before_jax(_CONFIG.value)
  cli.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  if supervise.needed():   # one process of several: run the job under a parent that reports a lost host
    sys.exit(supervise.run(sys.argv))
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG))
