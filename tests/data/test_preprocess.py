"""Image preprocessing against transformers' BlipImageProcessor (PIL backend), including odd images."""
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from iblip_jax.data import preprocess

HF = BlipImageProcessorPil(size={"height": 224, "width": 224})
rng = np.random.default_rng(0)


def _hf(image):
  return HF(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _images():
  rgb = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (97, 131, 1), dtype=np.uint8)], axis=2)
  palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
  palette.info["transparency"] = 3
  return {
      "rgb": Image.fromarray(rgb), "rgb_array": rgb, "grayscale": Image.fromarray(rgb[:, :, 0]),
      "rgba": Image.fromarray(rgba), "palette_transparent": palette, "cmyk": Image.fromarray(rgb).convert("CMYK"),
      "huge": Image.fromarray(rng.integers(0, 256, (2400, 3100, 3), dtype=np.uint8)),
      "tiny": Image.fromarray(rgb[:3, :5]),
  }


@pytest.mark.parametrize("name", sorted(_images()))
def test_matches_transformers(name):
  image = _images()[name]
  np.testing.assert_allclose(preprocess.preprocess_image(image), _hf(image), atol=1e-5)


def test_16_bit_keeps_the_high_byte():
  values = rng.integers(0, 65536, (50, 60), dtype=np.uint16)
  image16 = Image.fromarray(values)
  assert image16.mode.startswith("I;16")
  want = _hf(Image.fromarray((values >> 8).astype(np.uint8)))
  np.testing.assert_allclose(preprocess.preprocess_image(image16), want, atol=1e-5)
  np.testing.assert_allclose(preprocess.preprocess_image(values), want, atol=1e-5)


def test_exif_orientation_is_applied():
  rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", exif=exif, quality=100)
  stored = Image.open(io.BytesIO(buf.getvalue()))
  upright = stored.transpose(Image.Transpose.ROTATE_270)
  np.testing.assert_allclose(preprocess.preprocess_image(stored), _hf(upright), atol=1e-5)


def test_frame_sampling_is_uniform():
  np.testing.assert_array_equal(preprocess.sample_frame_indices(100), [0, 25, 50, 75])
  np.testing.assert_array_equal(preprocess.sample_frame_indices(6), [0, 1, 3, 4])
  frames = [np.full((8, 8, 3), i, np.uint8) for i in range(3)]
  assert preprocess.preprocess_video(frames).shape == (4, 224, 224, 3)


def test_bad_arrays_are_clear_errors():
  with pytest.raises(ValueError, match="dtype float64"):
    preprocess.preprocess_image(np.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match=r"shape \(4, 4, 5\)"):
    preprocess.preprocess_image(np.zeros((4, 4, 5), np.uint8))
