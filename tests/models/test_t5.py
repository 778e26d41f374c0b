"""T5 pieces against transformers' own functions."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from iblip_jax.models.t5 import relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 512)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
  rel = np.arange(-700, 700)
  want = HFT5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=bidirectional,
                                                 num_buckets=num_buckets, max_distance=max_distance)
  got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                                 max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
