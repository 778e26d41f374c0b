"""lmms-eval run as a user runs it (`python -m lmms_eval --model iblip_jax ...`), fully offline, on two tiny local
tasks the test writes (the demo's held-out shapes questions: a generation task scored by lmms-eval's exact_match and
a multiple-choice task scored by its log-likelihood ranking) with the demo checkpoint: every answer and both
accuracies equal our own evaluator's on the same records."""
import glob
import json
import os
import subprocess
import sys

import pytest

import iblip_jax
from iblip_jax.data import tokenize
from iblip_jax.demo import shapes
from iblip_jax.evaluation import evaluator, tasks

pytestmark = [pytest.mark.integration,   # launches lmms-eval's command line
              pytest.mark.xdist_group("lmms_eval")]   # the tests sharing `runs` on one worker: it is built once

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "demo_assets", "instructblip-demo")
N = 24

# The tasks as a user writes them for local data: lmms-eval reads a JSONL through datasets' json builder (no hub).
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
"""
VQA_YAML = TASK_YAML + """doc_to_text: !function utils.vqa_text
doc_to_target: !function utils.vqa_target
generation_kwargs: {generation}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
MC_YAML = TASK_YAML + """doc_to_text: !function utils.mc_text
doc_to_choice: !function utils.mc_choices
doc_to_target: answer_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
UTILS = '''from PIL import Image


def doc_to_visual(doc):
  return [Image.open(doc["image"]).convert("RGB")]


def vqa_text(doc, lmms_eval_specific_kwargs=None):
  return f"Question: {doc['question']} Short answer:"


def vqa_target(doc):
  return doc["answers"][0]


def mc_text(doc, lmms_eval_specific_kwargs=None):
  options = " ".join(f"({chr(97 + i)}) {c}" for i, c in enumerate(doc["candidates"]))
  return f"Question: {doc['question']} Options: {options}. Short answer:"


def mc_choices(doc):
  return doc["candidates"]
'''


def _records(data_dir, name: str) -> list[dict]:
  rows = [json.loads(line) for line in open(os.path.join(data_dir, f"{name}.jsonl"))][:N]
  return [dict(r, image=os.path.join(data_dir, r["image"])) for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """lmms-eval's results and samples, and our evaluator's predictions and scores, on the same records."""
  root = tmp_path_factory.mktemp("lmms")
  shapes.generate(str(root / "data"), train=0, val=N, seed=3)
  vqa, mc = _records(root / "data", "val_vqa"), _records(root / "data", "val_mc")
  task_dir = root / "tasks"
  task_dir.mkdir()
  qa = tasks.get("vqa")
  generation = {"max_new_tokens": qa.decoding.max_new_tokens, "min_new_tokens": qa.decoding.min_new_tokens,
                "num_beams": qa.decoding.num_beams, "length_penalty": qa.decoding.length_penalty,
                "repetition_penalty": qa.decoding.repetition_penalty, "temperature": 0, "do_sample": False}
  for name, records, yaml, output_type in (("tiny_vqa", vqa, VQA_YAML, "generate_until"),
                                           ("tiny_mc", mc, MC_YAML, "multiple_choice")):
    (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (task_dir / f"{name}.yaml").write_text(yaml.format(name=name, data=task_dir / f"{name}.jsonl",
                                                       output_type=output_type, generation=json.dumps(generation)))
  (task_dir / "utils.py").write_text(UTILS)
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "iblip_jax", "--model_args",
                        f"pretrained={DEMO}", "--batch_size", "8", "--tasks", "tiny_vqa,tiny_mc", "--include_path",
                        str(task_dir), "--output_path", str(root / "out"), "--log_samples"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  [results] = glob.glob(str(root / "out" / "*" / "*_results.json"))
  samples = {}
  for name in ("tiny_vqa", "tiny_mc"):
    [path] = glob.glob(str(root / "out" / "*" / f"*_samples_{name}.jsonl"))
    samples[name] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
  model, params = iblip_jax.from_pretrained(DEMO)
  model, tok = tokenize.for_model(DEMO, model)
  ours = {}
  for name, task, records in (("tiny_vqa", qa, vqa), ("tiny_mc", tasks.get("multiple_choice"), mc)):
    predictions = evaluator.infer(task, records, model, params, tok, batch_size=8, progress=False)
    ours[name] = (records, predictions, evaluator.score(task, records, predictions))
  return json.load(open(results))["results"], samples, ours, out


def test_generation_answers_and_accuracy_equal_our_evaluator(runs):
  results, samples, ours, out = runs
  records, predictions, scores = ours["tiny_vqa"]
  assert [s["input"] for s in samples["tiny_vqa"]] == [tasks.render_prompt(tasks.get("vqa"), r) for r in records]
  assert [s["filtered_resps"] for s in samples["tiny_vqa"]] == [p["prediction"] for p in predictions]
  assert results["tiny_vqa"]["exact_match,none"] == pytest.approx(scores["vqa"] / 100)
  assert 0 < scores["vqa"] < 100       # the comparison means something: some right, some wrong
  assert "tiny_vqa" in out.stdout and "exact_match" in out.stdout   # lmms-eval's own table


def test_log_likelihood_ranking_and_accuracy_equal_our_evaluator(runs):
  results, samples, ours, _ = runs
  records, predictions, scores = ours["tiny_mc"]
  for sample, prediction in zip(samples["tiny_mc"], predictions):
    losses = [float(pair[0]) for pair in sample["filtered_resps"]]
    assert losses == pytest.approx([-s for s in prediction["scores"]], rel=1e-5, abs=1e-5)
    assert sample["acc"] == float(prediction["prediction"] == int(sample["target"]))
  assert results["tiny_mc"]["acc,none"] == pytest.approx(scores["accuracy"] / 100)
  assert 0 < scores["accuracy"] < 100


class _Request:   # what the model reads of lmms-eval's Instance
  def __init__(self, *args):
    self.args = args


def test_visual_inputs_stop_strings_and_bad_input():
  """Several visuals are Images(...) in order, `until` cuts the answer, an unreadable image answers "" without
  stopping the others, unknown --model_args are named, and multi-round requests follow the task's rounds."""
  from PIL import Image
  from iblip_jax.errors import BadInput
  from iblip_jax.inference import Images
  from iblip_jax.lmms_eval_model import IblipJax
  with pytest.raises(BadInput, match="'temprature'"):
    IblipJax(pretrained=DEMO, temprature=0)
  lm = IblipJax(pretrained=DEMO, batch_size=4)
  a, b = (Image.new("RGB", (32, 32), c) for c in ("red", "blue"))
  docs = [[a], [a, b], [b, a], [b"not an image"]]
  lm.task_dict = {"t": {"test": docs}}
  prompt = "Question: What color is the shape? Short answer:"
  settings = {"max_new_tokens": 5, "num_beams": 1, "temperature": 0, "until": ["\n"]}
  answers = lm.generate_until([_Request(prompt, dict(settings), lambda d: d, i, "t", "test") for i in range(4)])
  greedy = dict(num_beams=1, max_new_tokens=5, min_new_tokens=1, repetition_penalty=1.0)
  assert answers[:3] == [lm.pipe(a, prompt, **greedy), lm.pipe(Images(a, b), prompt, **greedy),
                         lm.pipe(Images(b, a), prompt, **greedy)]
  assert answers[3] == ""
  first_word = answers[0].split()[0]
  cut = lm.generate_until([_Request(prompt, dict(settings, until=[first_word]), lambda d: d, 0, "t", "test")])
  assert cut == [answers[0].split(first_word, 1)[0]]
  with pytest.raises(BadInput, match="without an image"):
    lm.generate_until([_Request(prompt, dict(settings), lambda d: [], 0, "t", "test")])
  # multi-round: each round's context from the task's doc_to_text with the answers so far, until it says terminal
  follow = "Question: What shape is it? Short answer:"
  seen = []

  def doc_to_text(doc, previous_output, round_idx, previous_round_info):
    seen.append((list(previous_output), round_idx, previous_round_info))
    return [b], follow, round_idx == 2, previous_output, {"round": round_idx}

  [rounds] = lm.generate_until_multi_round([_Request(prompt, dict(settings), lambda d: d, doc_to_text, 0, "t",
                                                     "test")])
  want = [lm.pipe(a, prompt, **greedy), lm.pipe(b, follow, **greedy)]
  assert rounds == want
  assert seen == [(want[:1], 1, None), (want, 2, {"round": 1})]
