"""Frames from video files (mp4, webm, avi, mkv, mov): the n a video input uses, sampled uniformly over the whole
clip as the original InstructBLIP video evaluation sampled them (preprocess.video_frame_indices: frames 0, N/n,
2N/n, ... of N; a clip shorter than n repeats frames the same way), decoded with PyAV (the `video` extra; its wheels
carry their own ffmpeg), converted to RGB."""
import os

from PIL import Image

from iblip_jax.data import preprocess
from iblip_jax.extras import require

FRAMES = 4   # the frames a video input uses: the paper's video QA (LAVIS's n_frms: 4)
EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


def is_video_file(source) -> bool:
  return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(EXTENSIONS)


def read_frames(path, n: int) -> list[Image.Image]:
  """The n frames of the clip at `path` (local) that a video input uses, in order. Raises OSError for a missing
  file and ValueError (naming the file and what the decoder said) for one that is not a readable video."""
  av = require("av", "video", "reading video files")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such video file")
  try:
    total = _count_frames(av, path)
    if total < 1:
      raise ValueError("it has no video frames")
    wanted = preprocess.video_frame_indices(total, n)
    kept: dict[int, Image.Image] = {}
    with av.open(path) as container:
      for i, frame in enumerate(container.decode(video=0)):
        if i in wanted:
          kept[i] = frame.to_image().convert("RGB")
        if i >= wanted.max():
          break
  except (av.FFmpegError, ValueError, IndexError, EOFError) as e:
    raise ValueError(f"{path}: not a readable video ({' '.join(str(e).split())})") from None
  missing = [int(i) for i in wanted if int(i) not in kept]
  if missing:   # the container said more frames than the decoder gave
    raise ValueError(f"{path}: frames {missing} of {total} could not be decoded (the file is cut or damaged)")
  return [kept[int(i)] for i in wanted]


def _count_frames(av, path: str) -> int:
  """The clip's frame count: the container's when it states one (mp4, mov), else counted by decoding (webm, avi
  often do not state it)."""
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("it has no video stream")
    stated = container.streams.video[0].frames
    if stated > 0:
      return stated
    return sum(1 for _ in container.decode(video=0))
