"""The vision tower's position interpolation against torch, and the tower at another image size."""
import numpy as np
import pytest
import torch

import iblip_jax
import oracle
from iblip_jax.models.vit import torch_bicubic_matrix


@pytest.mark.parametrize("n_in,n_out", [(16, 24), (16, 9), (15, 15), (4, 37)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out):
  grid = torch.randn(1, 3, n_in, n_in, dtype=torch.float64)
  want = torch.nn.functional.interpolate(grid, size=(n_out, n_out), mode="bicubic", align_corners=False)
  m = torch_bicubic_matrix(n_in, n_out).astype(np.float64)
  got = np.einsum("oi,cij,pj->cop", m, grid[0].numpy(), m)
  np.testing.assert_allclose(got, want[0].numpy(), atol=1e-6)


def test_other_image_size_interpolates_positions_like_transformers(tmp_path):
  hf = oracle.tiny_hf_model()
  hf.save_pretrained(tmp_path / "hf")
  model, params = iblip_jax.from_pretrained(str(tmp_path / "hf"))
  pixels = np.random.default_rng(1).standard_normal((2, 38, 38, 3)).astype(np.float32)  # 19x19 patches, not 15x15
  got = model.apply({"params": params}, pixels, method=lambda m, x: m.ln_vision(m.vision(x)))
  with torch.no_grad():
    want = hf.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True)
  assert got.shape == (2, 1 + 19 * 19, 32)
  np.testing.assert_allclose(got, want.last_hidden_state.numpy(), atol=1e-4, rtol=0)
