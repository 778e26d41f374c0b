"""`--config.mode=eval`: the configured evaluations on the mesh, with the pretrained model or the latest training
checkpoint in --workdir when there is one. Writes predictions and metrics under workdir/eval/ (process 0)."""
import json

from iblip_jax import distributed
from iblip_jax.evaluation import report
from iblip_jax.run import common, restore
from iblip_jax.run.settings import Settings


def run(s: Settings) -> dict:
  model, params, step, mesh, rules = restore.inference_state(s)
  model, tok = common.load_tokenizers(s, model)
  results = common.run_evals(s, model, params, tok, common.eval_dir(s.workdir, step), mesh, rules)
  if distributed.is_primary():
    print(json.dumps({"step": step, **results}, indent=2))
    if s.paper_model:   # beside the paper's Table 1 (config.paper_model): table1.md and table1.png
      print(report.write_table1(results, {e.name: e.task for e in s.evals}, s.paper_model,
                                common.eval_dir(s.workdir, step), run=f"this run (step {step})"))
  return results
