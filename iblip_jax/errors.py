"""The exception types for problems the user fixes: a config, a checkpoint, a workdir, data, an input.

`python -m iblip_jax.main` prints a UserError's message alone (it says what to fix, a traceback would bury it);
any other exception is a bug and shows its traceback.
"""


class UserError(ValueError):
  """A problem with the user's config, checkpoint, workdir or data; the message names it and says what to fix."""


class BadInput(UserError):
  """An image, a prompt or a setting that cannot be answered; the message says which and why."""


class CheckpointError(UserError):
  """A checkpoint directory that cannot be loaded; the message names the file and key."""
