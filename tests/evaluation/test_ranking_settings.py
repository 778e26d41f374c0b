"""Per-task ranking settings on the tiny model: candidate chunking equals unchunked ranking, several words per class
combine by logsumexp, length normalisation divides by the candidate's length; NoCaps reports CIDEr per domain."""
import json

import numpy as np
import pytest

import iblip_jax
from iblip_jax import prompts
from iblip_jax.data import preprocess, readers, tokenize
from iblip_jax.evaluation import evaluator, metrics, tasks

# uneven lists and lengths: 7 candidates for one record, 1 for another
CANDIDATES = ["red", "blue", "very dark green", "a big cat", "dog", "light blue", "no"]
COUNTS = [7, 3, 1, 6, 4]


def _records(images):
  return [{"id": i, "image": im, "question": "what color is the cat", "candidates": CANDIDATES[:n],
           "answer_index": 0} for i, (im, n) in enumerate(zip(images, COUNTS))]


def _task(**kw):
  return tasks.Task("toy_rank", prompts.QA, inference="rank", metric="accuracy", **kw)


@pytest.mark.slow   # three ranking programs compiled (~15 s on 2 cores)
def test_chunked_ranking_equals_unchunked(tiny_eval):
  model, params, tok, images = tiny_eval
  records = _records(images)
  whole = evaluator.infer(_task(), records, model, params, tok, batch_size=4, progress=False)
  # chunks of 3: three calls for the first batch (7 candidates), the last one padded; a record with fewer
  # candidates than a chunk; a second batch that needs only two calls
  chunked = evaluator.infer(_task(candidate_chunk=3), records, model, params, tok, batch_size=4, progress=False)
  for w, c, n in zip(whole, chunked, COUNTS):
    assert len(c["scores"]) == n and c["prediction"] == w["prediction"]
    np.testing.assert_allclose(c["scores"], w["scores"], rtol=1e-5, atol=1e-5)
  # and both equal a direct call of iblip_jax.rank on one record (the oracle: summed token log-likelihoods)
  inputs = tokenize.encode_prompts(tok, [tasks.render_prompt(_task(), records[0])])
  labels = tokenize.encode_candidates(tok, [CANDIDATES])
  direct, _ = iblip_jax.rank(model, params, pixel_values=preprocess.preprocess_image(images[0], 30)[None],
                             **inputs, candidate_labels=labels)
  np.testing.assert_allclose(whole[0]["scores"], np.asarray(direct)[0], rtol=1e-5, atol=1e-5)


def test_normalisation_divides_by_the_candidate_length(tiny_eval):
  model, params, tok, images = tiny_eval
  records = _records(images)[:1]
  summed = evaluator.infer(_task(), records, model, params, tok, batch_size=1, progress=False)[0]["scores"]
  mean = evaluator.infer(_task(normalize=True, candidate_chunk=4), records, model, params, tok, batch_size=1,
                         progress=False)[0]["scores"]
  lengths = (tokenize.encode_candidates(tok, [CANDIDATES])[0] != tokenize.IGNORE).sum(axis=1)
  np.testing.assert_allclose(mean, np.asarray(summed) / lengths, rtol=1e-5)


def test_several_words_per_class_combine_by_logsumexp(tiny_eval):
  model, params, tok, images = tiny_eval
  records = [{"id": i, "image": im, "text": "a cat", "label": i % 2} for i, im in enumerate(images)]
  task = tasks.get("hateful_memes_verbalizers")
  words = evaluator.infer(tasks.Task("words", task.prompt, inference="rank", metric="auc",
                                     candidates=("no", "false", "yes", "true")), records, model, params, tok,
                          batch_size=4, progress=False)
  classes = evaluator.infer(task, records, model, params, tok, batch_size=4, progress=False)
  for w, c in zip(words, classes):
    want = [np.logaddexp(*w["scores"][:2]), np.logaddexp(*w["scores"][2:])]
    np.testing.assert_allclose(c["scores"], want, rtol=1e-5)
    assert c["prediction"] == int(np.argmax(want))
  assert evaluator.score(task, records, classes)["AUC"] >= 0   # the positive class's probability is defined
  with pytest.raises(ValueError, match="one non-empty group per candidate class"):
    tasks.Task("bad", "x", inference="rank", metric="accuracy", candidates=("a", "b"), class_words=(("a",),))
  assert tasks.get("msvd_qa").candidate_chunk and tasks.get("msrvtt_qa").candidate_chunk
  assert not any(t.normalize for t in tasks.TASKS.values())   # LAVIS sums; parity by default


def test_nocaps_carries_domains_and_reports_cider_per_domain(tmp_path):
  """The reader keeps each image's domain; the score adds CIDEr over each domain's images (computed by the
  captioning metric on that subset: the hand-made oracle) beside the overall CIDEr."""
  domains = ["in-domain", "near-domain", "out-domain", "in-domain", "out-domain", "near-domain"]
  images = [{"id": i, "file_name": f"{i}.jpg", "open_images_id": str(i), "domain": d} for i, d in enumerate(domains)]
  refs = [["a red car on a road", "a car"], ["a dog on grass", "a brown dog"], ["a jellyfish in water", "a jelly"],
          ["a man on a bike", "a cyclist"], ["an accordion", "a man plays an accordion"], ["two cats", "cats sleep"]]
  (tmp_path / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": [
      {"image_id": i, "id": 10 * i + k, "caption": c} for i, rs in enumerate(refs) for k, c in enumerate(rs)]}))
  records = list(readers.read_nocaps(str(tmp_path)))
  assert [r["domain"] for r in records] == domains
  preds = [{"prediction": p} for p in ("a red car", "a dog", "a fish in water", "a man on a bike", "a man", "cats")]
  result = evaluator.score(tasks.get("nocaps"), records, preds)
  for domain in ("in-domain", "near-domain", "out-domain"):
    subset = [i for i, d in enumerate(domains) if d == domain]
    want = metrics.caption_metrics({i: preds[i]["prediction"] for i in subset}, {i: refs[i] for i in subset})
    assert result[f"CIDEr_{domain}"] == pytest.approx(100 * want["CIDEr"])
  overall = metrics.caption_metrics({i: p["prediction"] for i, p in enumerate(preds)}, dict(enumerate(refs)))
  assert result["CIDEr"] == pytest.approx(100 * overall["CIDEr"])
  assert tasks.get("nocaps").headline in result
