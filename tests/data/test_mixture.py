"""Mixture weights and sampling frequencies, in both modes."""
import collections
import math

import pytest

from iblip_jax.data import mixture


def test_balanced_weights_are_sqrt_of_size_times_multiplier():
  w = mixture.weights({"a": 100, "b": 400, "c": 900}, {"c": 0.5})
  raw = {"a": 10.0, "b": 20.0, "c": 15.0}
  assert w == pytest.approx({k: v / 45.0 for k, v in raw.items()})
  assert mixture.weights({"a": 100, "b": 300}, balanced=False) == pytest.approx({"a": 0.25, "b": 0.75})


def test_bad_mixtures_are_clear_errors():
  with pytest.raises(ValueError, match="not in the mixture"):
    mixture.weights({"a": 1}, {"b": 2.0})
  with pytest.raises(ValueError, match="no examples"):
    mixture.weights({"a": 0, "b": 3})


def _datasets():
  sizes = {"coco": 50, "vqa": 200, "ocr": 13}
  return sizes, {n: mixture.source([{"dataset": n, "i": i} for i in range(s)]) for n, s in sizes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("balanced", [True, False])
def test_per_example_frequencies_over_20k_draws(balanced):
  # 20k draws: 4 sigma is at most 0.014 here, a tenth of the gap between the balanced and the proportional weights
  # (0.29 / 0.57 / 0.15 against 0.19 / 0.76 / 0.05)
  n = 20_000
  sizes, datasets = _datasets()
  probs = mixture.weights(sizes, balanced=balanced)
  ds = mixture.mix(datasets, probs, seed=0)
  counts = collections.Counter(ds[i]["dataset"] for i in range(n))
  for name, p in probs.items():
    sigma = math.sqrt(p * (1 - p) / n)
    assert counts[name] / n == pytest.approx(p, abs=4 * sigma)


@pytest.mark.slow
def test_per_step_mode_gives_single_dataset_batches_in_proportion():
  sizes, datasets = _datasets()
  probs = mixture.weights(sizes)
  ds = mixture.mix(datasets, probs, seed=1, batch_size=4, batch_fn=list)
  counts = collections.Counter()
  n = 6_000   # batches (24k examples): 4 sigma is at most 0.026, a tenth of the gaps between the datasets' weights
  for i in range(n):
    names = {r["dataset"] for r in ds[i]}
    assert len(names) == 1
    counts[names.pop()] += 1
  for name, p in probs.items():
    sigma = math.sqrt(p * (1 - p) / n)
    assert counts[name] / n == pytest.approx(p, abs=4 * sigma)


def test_mixture_is_deterministic_and_reshuffles_each_epoch():
  sizes, datasets = _datasets()
  probs = mixture.weights(sizes)
  a = [mixture.mix(datasets, probs, seed=3)[i] for i in range(300)]
  b = [mixture.mix(datasets, probs, seed=3)[i] for i in range(300)]
  assert a == b
  ocr = [r["i"] for r in a if r["dataset"] == "ocr"]
  assert sorted(ocr[:13]) == list(range(13)) and ocr[:13] != ocr[13:26]  # each epoch once, in a new order
