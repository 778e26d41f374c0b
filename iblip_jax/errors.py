"""The one exception type for problems the user fixes: a config, a checkpoint, a workdir, data.

`python -m iblip_jax.main` prints a UserError's message alone (it says what to fix, a traceback would bury it);
any other exception is a bug and shows its traceback.
"""


class UserError(ValueError):
  """A problem with the user's config, checkpoint, workdir or data; the message names it and says what to fix."""
