"""The one way an image (or a video's frames) becomes model input: open, check, preprocess.

Every caller goes through here: training (skips and counts a bad image), evaluation and predict (an error row
naming it), the Python API and the servers (BadImage with the message). What is checked, before and while decoding:
no such file, not an image, too many pixels (from the header, before decoding: a decompression bomb is refused
cheaply), empty, truncated or corrupt data. What is converted with a note a person should see: an animated image
(its first frame), CMYK. Everything else that is not 8-bit RGB is converted silently (preprocess.to_rgb).
"""
import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from iblip_jax.data import preprocess, video_files
from iblip_jax.errors import BadInput

# Above this an image is refused before it is decoded (people and servers). Training and evaluation pass None: the
# datasets' images are trusted up to PIL's own decompression-bomb limit (179M pixels).
MAX_PIXELS = 64_000_000


class BadImage(BadInput):
  """An image that cannot be used. `reason` is "missing_image" (no such file) or "unreadable_image" (anything
  else), the training input's skip reasons."""

  def __init__(self, message: str, reason: str = "unreadable_image"):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An image checked and preprocessed for the model: `image` (RGB, for drawing), `pixels` (S, S, 3) normalised,
  `notes` (what was done to it that a person should know, e.g. "animated image: the first of its 12 frames")."""
  image: Image.Image
  pixels: np.ndarray
  notes: tuple[str, ...] = ()


def describe(source) -> str:
  """How an image is named in messages: its path, else its type."""
  return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def open_image(source, *, max_pixels: int | None = MAX_PIXELS, name: str | None = None
               ) -> tuple[Image.Image, tuple[str, ...]]:
  """A path, PIL image, uint8/uint16 array or bytes (an encoded file) -> (8-bit RGB PIL image, notes), or BadImage
  naming the image (`name`, else its path) and the problem."""
  what = name or describe(source)
  if isinstance(source, np.ndarray):
    try:
      return preprocess.to_rgb(source), ()
    except ValueError as e:
      raise BadImage(f"{what}: {e}") from None
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  elif isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
    raise BadImage(f"{what}: no such image file", "missing_image")
  try:
    # PIL warns between MAX_IMAGE_PIXELS and twice that and raises beyond; below its limit an image is usable, and
    # under `-W error` the warning would turn a good image into a bad one. (catch_warnings is not thread-safe before
    # Python 3.14: a race can at worst leave this one filter in place.)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = source if isinstance(source, Image.Image) else Image.open(source)
  except UnidentifiedImageError:
    raise BadImage(f"{what}: not an image (PIL recognises no image format in it); use a JPEG, PNG, WebP, GIF or "
                   "BMP file") from None
  except Image.DecompressionBombError as e:
    raise BadImage(f"{what}: refused as too large ({e})") from None
  except OSError as e:
    raise BadImage(f"{what}: cannot be read ({e})") from None
  w, h = image.size
  if max_pixels is not None and w * h > max_pixels:
    raise BadImage(f"{what}: the image is {w} x {h} pixels ({w * h / 1e6:.0f} megapixels), more than the "
                   f"{max_pixels / 1e6:.0f} megapixels accepted; scale it down first")
  if w < 1 or h < 1:
    raise BadImage(f"{what}: the image is empty ({w} x {h} pixels)")
  notes = []
  frames = getattr(image, "n_frames", 1)
  if frames > 1:
    image.seek(0)
    notes.append(f"animated image: the first of its {frames} frames is used")
  if image.mode == "CMYK":
    notes.append("CMYK image: converted to RGB (printing colours may look different on screen)")
  try:
    image.load()   # decode now: a truncated file fails here, not later in a worker's batch
    rgb = preprocess.to_rgb(image)
  except Exception as e:  # noqa: BLE001 - whatever a decoder raises (OSError, SyntaxError, a plugin's) is the image's
    raise BadImage(f"{what}: the image data cannot be decoded ({type(e).__name__}: {_clip(e)})") from None
  return rgb, tuple(notes)


def prepare(source, size: int, *, max_pixels: int | None = MAX_PIXELS, name: str | None = None) -> PreparedImage:
  """open_image + the model's preprocessing (square bicubic resize to `size`, CLIP normalisation). A PreparedImage
  passes through (resized again if it was prepared for another size)."""
  if isinstance(source, PreparedImage):
    if source.pixels.shape[0] != size:
      return PreparedImage(source.image, preprocess.preprocess_image(source.image, size), source.notes)
    return source
  image, notes = open_image(source, max_pixels=max_pixels, name=name)
  return PreparedImage(image, preprocess.preprocess_image(image, size), notes)


def pixels(source, size: int, *, frames: int = 0, max_pixels: int | None = None, name: str | None = None
           ) -> np.ndarray:
  """Model input of one record: (size, size, 3) for an image, or (frames, size, size, 3) for a video given as its
  frames (a list of image sources; `frames` of them sampled uniformly, preprocess.video_frame_indices) or as a video
  file (data/video_files.py, sampled the same way). BadImage names the image, frame or video that failed."""
  if not frames:
    return prepare(source, size, max_pixels=max_pixels, name=name).pixels
  if video_files.is_video_file(source):   # a video file: its frames decoded, the n used sampled as below
    source = video_frames(source, frames)
  listed = list(source or ())
  if not listed:
    raise BadImage("a video without frames", "missing_image")
  return np.stack([prepare(listed[i], size, max_pixels=max_pixels).pixels
                   for i in preprocess.video_frame_indices(len(listed), frames)])


def video_frames(path, n: int) -> list[Image.Image]:
  """The n frames of a video file that a video input uses (data/video_files.py); BadImage names a missing or
  unreadable file."""
  try:
    return video_files.read_frames(path, n)
  except FileNotFoundError as e:
    raise BadImage(str(e), "missing_image") from None
  except (OSError, ValueError) as e:
    raise BadImage(str(e)) from None


def _clip(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."
