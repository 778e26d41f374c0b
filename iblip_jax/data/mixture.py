"""Balanced dataset mixture: probability proportional to sqrt(size) times a per-dataset multiplier (the paper's
"balanced sampling"), or proportional to size (`balanced=False`, the ablation).

Two modes, both deterministic for a seed and checkpointable (they are grain MapDatasets: the iterator state is a
position):
- per example: every example is drawn from the mixture;
- per step (LAVIS's trainer): every batch comes from one dataset, the dataset drawn from the mixture.
grain's `mix` interleaves in exact proportion rather than drawing at random, so the frequencies match the ratios
up to rounding at every point of the stream, not only on average.
"""
import math
from typing import Mapping, Sequence

import grain


def weights(sizes: Mapping[str, int], multipliers: Mapping[str, float] | None = None,
            balanced: bool = True) -> dict[str, float]:
  """Normalised sampling probabilities per dataset name."""
  multipliers = dict(multipliers or {})
  unknown = sorted(set(multipliers) - set(sizes))
  if unknown:
    raise ValueError(f"mixture multipliers name datasets that are not in the mixture: {unknown}")
  empty = sorted(n for n, s in sizes.items() if s <= 0)
  if empty:
    raise ValueError(f"datasets with no examples cannot be mixed: {empty}")
  raw = {n: (math.sqrt(s) if balanced else float(s)) * multipliers.get(n, 1.0) for n, s in sizes.items()}
  total = sum(raw.values())
  return {n: w / total for n, w in raw.items()}


def mix(datasets: Mapping[str, grain.MapDataset], probs: Mapping[str, float], *, seed: int,
        batch_size: int | None = None, batch_fn=None) -> grain.MapDataset:
  """An infinite mixture. With `batch_size`, each element is a batch from one dataset (per-step mode)."""
  names = sorted(datasets)
  parts = []
  for i, name in enumerate(names):
    ds = datasets[name].shuffle(seed=seed + i).repeat()  # a new order every epoch (grain reshuffles per epoch)
    if batch_size is not None:
      ds = ds.batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    parts.append(ds)
  return grain.MapDataset.mix(parts, [probs[n] for n in names])


def source(records: Sequence) -> grain.MapDataset:
  return grain.MapDataset.source(records)
