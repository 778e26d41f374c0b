"""Image and video preprocessing: what transformers' BlipImageProcessor (PIL backend) and LAVIS's
`blip_image_eval` do for InstructBLIP: RGB, square bicubic resize (no crop, no aspect kept), 1/255, CLIP mean/std.

Images that are not 8-bit RGB are converted first: transparency is composited onto white (as transformers does),
palette/grayscale/CMYK go through PIL's RGB conversion, 16-bit and 32-bit integer images keep their high byte,
and the EXIF orientation is applied (a phone photo stored sideways is shown upright).
"""
import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def to_rgb(image) -> Image.Image:
  """Any PIL image or uint8/uint16 array -> 8-bit RGB PIL image."""
  if isinstance(image, np.ndarray):
    if image.dtype == np.uint16:
      image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
      raise ValueError(f"image array of dtype {image.dtype}; expected uint8 or uint16 (H, W[, C])")
    if image.ndim == 3 and image.shape[2] == 1:
      image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
      raise ValueError(f"image array of shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    image = Image.fromarray(image)
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit integers: keep the most significant 8 bits
    values = np.asarray(image, dtype=np.int64)
    shift = 8 if image.mode.startswith("I;16") or values.max(initial=0) < 65536 else 24
    image = Image.fromarray((np.clip(values, 0, None) >> shift).clip(0, 255).astype(np.uint8))
  elif image.mode == "F":
    values = np.asarray(image, dtype=np.float32)
    scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
    image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8))
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
  return image.convert("RGB")


def preprocess_image(image, size: int = 224) -> np.ndarray:
  """PIL image or uint8 array -> normalised float32 (size, size, 3)."""
  resized = to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)
  return ((np.asarray(resized, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def sample_frame_indices(num_frames: int, n: int = 4) -> np.ndarray:
  """Uniform sampling as the original InstructBLIP video evaluation: arange(0, N, N / n) truncated."""
  if num_frames < 1:
    raise ValueError("a video needs at least one frame")
  return np.minimum(np.arange(0, num_frames, num_frames / n).astype(int)[:n], num_frames - 1)


def video_frame_indices(num_frames: int, n: int = 4) -> np.ndarray:
  """The n frames a video input uses: sample_frame_indices, with the last one repeated when the video has fewer."""
  idx = sample_frame_indices(num_frames, n)
  return np.concatenate([idx, np.full(n - len(idx), idx[-1])]) if len(idx) < n else idx


def preprocess_video(frames, n: int = 4, size: int = 224) -> np.ndarray:
  """A sequence of frames (PIL images or arrays, RGB) -> (n, size, size, 3), n frames sampled uniformly."""
  frames = list(frames)
  return np.stack([preprocess_image(frames[i], size) for i in video_frame_indices(len(frames), n)])
