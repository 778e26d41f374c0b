"""Metrics against hand-computed cases and against pycocoevalcap's scorers called directly."""
import numpy as np
import pytest

from iblip_jax.evaluation import metrics, vqa_normalize


def test_vqa_accuracy_leave_one_out():
  answers = ["dog"] * 3 + ["cat"] * 7
  # each of the 10 subsets drops one annotator: 3 subsets keep 2 "dog"s (2/3), 7 keep all 3 (1)
  assert metrics.vqa_accuracy("dog", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
  assert metrics.vqa_accuracy("cat", answers) == pytest.approx(1.0)
  assert metrics.vqa_accuracy("cow", answers) == 0.0
  # one "dog" annotator: kept in 9 of the 10 subsets, where it counts 1/3
  assert metrics.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(9 * (1 / 3) / 10)
  assert metrics.vqa_accuracy("dog", ["dog", "dog"] + ["cat"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_official_normalises_only_when_annotators_disagree():
  unanimous = ["two"] * 10
  assert metrics.vqa_accuracy("Two", unanimous) == 0.0        # no normalisation: case matters
  assert metrics.vqa_accuracy("two", unanimous) == 1.0
  mixed = ["two"] * 9 + ["2"]
  assert metrics.vqa_accuracy("Two.", mixed) == 1.0           # "two" -> "2", period stripped: matches all
  assert metrics.vqa_accuracy("the 2!", mixed) == 1.0
  # LAVIS normalises the prediction always, the answers' punctuation only
  assert metrics.vqa_accuracy("Two", unanimous, variant="lavis") == 0.0  # "2" vs unnormalised "two"
  assert metrics.vqa_accuracy("the dog", ["dog"] * 10, variant="lavis") == 1.0
  assert metrics.vqa_accuracy("the dog", ["dog"] * 10) == 0.0


def test_normalisation_rules():
  assert vqa_normalize.normalize("  The Dogs, running!\n") == "dogs running"
  assert vqa_normalize.normalize("1,000 dollars.") == "1000 dollars"  # digit comma digit: marks deleted
  assert vqa_normalize.normalize("3.5") == "3.5"                      # periods between digits stay
  assert vqa_normalize.normalize("yes/no") == "yes no"
  assert vqa_normalize.normalize("dont know") == "don't know"
  assert vqa_normalize.normalize("an apple") == "apple"


def test_exact_match_and_ivqa():
  assert metrics.exact_match("The Table.", "table") == 1.0
  assert metrics.exact_match("tables", "table") == 0.0
  assert metrics.ivqa_accuracy("two", ["2", "2", "3", "two", "4"]) == 1.0
  assert metrics.ivqa_accuracy("3", ["2", "2", "3", "two", "4"]) == 0.5
  assert metrics.ivqa_accuracy("5", ["2", "2", "3", "two", "4"]) == 0.0


def test_auc_mrr_and_multiple_choice():
  assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
  assert metrics.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
  assert metrics.roc_auc([1, 0, 1], [3.0, 1.0, 2.0]) == 1.0
  scores = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.7], [0.0, 0.0, 1.0]])
  assert metrics.mean_reciprocal_rank(scores, [1, 0, 2]) == pytest.approx((1 + 1 / 2 + 1) / 3)
  assert metrics.multiple_choice_accuracy([1, 2, 0], [1, 0, 0]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="both positive and negative"):
    metrics.roc_auc([1, 1], [0.2, 0.3])


def test_caption_metrics_against_pycocoevalcap_directly():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  refs = {1: ["a dog runs on the grass", "a brown dog running outside"],
          2: ["two cats sleep on a sofa", "cats sleeping together on a couch"],
          3: ["a man rides a red bicycle", "a person cycling down the road"]}
  preds = {1: "a dog running on grass", 2: "two cats on a couch", 3: "a man riding a bicycle"}
  got = metrics.caption_metrics(preds, refs)
  # lower-case words without punctuation: the PTB tokenizer leaves them as they are
  gts = {k: v for k, v in refs.items()}
  res = {k: [v] for k, v in preds.items()}
  assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
  assert got["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
  assert 0 < got["CIDEr"] < 10


def test_caption_bleu_of_a_copied_reference_is_one():
  refs = {1: ["a small dog runs across the green grass"], 2: ["two large cats sleep on the old sofa"]}
  got = metrics.caption_metrics({1: "A small dog runs across the green grass.",
                                 2: "two large cats sleep on the old sofa"}, refs)
  assert got["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
