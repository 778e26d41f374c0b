"""`--config.mode=eval`: the configured evaluations on the pretrained model, or on the latest training
checkpoint in --workdir when there is one. Writes predictions and metrics under workdir/eval/."""
import json
import os

from iblip_jax.run import common, restore


def run(config, workdir: str) -> dict:
  common.validate(config, workdir, mode="eval")
  model, params, step = restore.params_with_latest_checkpoint(config, workdir)
  model, tok = common.load_tokenizers(config, model)
  results = common.run_evals(config, model, params, tok, os.path.join(workdir, "eval", f"step_{step}"))
  print(json.dumps({"step": step, **results}, indent=2))
  return results
