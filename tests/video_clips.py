"""Video clips for the tests, written with PyAV: frame i a solid colour of its own (colour(i)), so a decoded frame
says which one it is."""
import numpy as np


def colour(i: int) -> tuple[int, int, int]:
  return ((37 * i) % 256, (91 * i + 40) % 256, (173 * i + 80) % 256)


def write(path, frames: int, codec: str = "mpeg4", size: int = 64):
  import av
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p" if codec != "mjpeg" else "yuvj420p"
    for i in range(frames):
      picture = np.zeros((size, size, 3), np.uint8) + np.array(colour(i), np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path
