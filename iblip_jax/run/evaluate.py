"""`--config.mode=eval`: the configured evaluations on the mesh, with the pretrained model or the latest training
checkpoint in --workdir when there is one. Writes predictions and metrics under workdir/eval/ (process 0)."""
import json

from etils import epath

from iblip_jax import distributed
from iblip_jax.run import common, restore


def run(config, workdir: str) -> dict:
  common.validate(config, workdir, mode="eval")
  model, params, step, mesh, rules = restore.inference_state(config, workdir)
  model, tok = common.load_tokenizers(config, model)
  results = common.run_evals(config, model, params, tok, str(epath.Path(workdir) / "eval" / f"step_{step}"), mesh,
                             rules)
  if distributed.is_primary():
    print(json.dumps({"step": step, **results}, indent=2))
  return results
