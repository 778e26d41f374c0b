"""What the modes share (run/common.py): evaluation records read once, cleaned as configured."""
import json

from iblip_jax.data.sources import Source
from iblip_jax.run import common, settings


def test_read_evals_cleans_questions_only_when_asked(tmp_path):
  path = tmp_path / "gqa.jsonl"
  path.write_text(json.dumps({"id": 0, "image": "a.png", "question": "Is the CAT (left) black?", "answers": ["No."]}))
  source = Source(name="gqa", where="config.evals.gqa", task="gqa", format="jsonl", path=str(path))
  as_written = common.read_evals(settings.Settings(evals=(source,)))["gqa"][0]
  lavis = common.read_evals(settings.Settings(evals=(source,), text_processing="lavis"))["gqa"][0]
  assert as_written["question"] == "Is the CAT (left) black?"
  assert lavis["question"] == "is the cat left black?" and lavis["answers"] == ["No."]
