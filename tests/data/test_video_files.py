"""Video files (data/video_files.py, through data/images.pixels): clips written here with PyAV, one solid colour per
frame, decode to the frames the uniform sampling picks (frames 0, N/4, N/2, 3N/4), in order; a clip shorter than
the frames asked for repeats frames as the reference sampling does; corrupt, cut and missing files are BadImage
naming the file."""
import numpy as np
import pytest

import video_clips
from iblip_jax.data import images, preprocess, video_files

av = pytest.importorskip("av")


def _colours(frames):
  return [tuple(int(round(c)) for c in np.asarray(f, np.float32).reshape(-1, 3).mean(0)) for f in frames]


def _close(got, want, tol=12):   # lossy codecs move a solid colour by a few levels
  return all(abs(a - b) <= tol for g, w in zip(got, want) for a, b in zip(g, w)) and len(got) == len(want)


@pytest.mark.parametrize("name, codec", [("clip.mp4", "mpeg4"), ("clip.avi", "mjpeg"), ("clip.mkv", "mpeg4")])
def test_the_uniformly_sampled_frames_in_order(tmp_path, name, codec):
  path = video_clips.write(tmp_path / name, 10, codec)
  assert video_files.is_video_file(path)
  frames = video_files.read_frames(path, 4)
  assert list(preprocess.video_frame_indices(10, 4)) == [0, 2, 5, 7]
  assert _close(_colours(frames), [video_clips.colour(i) for i in (0, 2, 5, 7)]), _colours(frames)


def test_a_short_clip_repeats_frames_as_the_reference_sampling_does(tmp_path):
  frames = video_files.read_frames(video_clips.write(tmp_path / "two.mp4", 2), 4)
  assert _close(_colours(frames), [video_clips.colour(i) for i in (0, 0, 1, 1)])   # arange(0, 2, 2 / 4) truncated


def test_model_input_from_a_file_equals_the_same_frames_given_as_images(tmp_path):
  path = video_clips.write(tmp_path / "clip.mp4", 9)
  from_file = images.pixels(str(path), 32, frames=4)
  listed = video_files.read_frames(path, 4)
  assert from_file.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(from_file, np.stack([preprocess.preprocess_image(f, 32) for f in listed]))


def test_bad_video_files_are_named(tmp_path):
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"\x00\x01 not a video at all" * 50)
  with pytest.raises(images.BadImage, match="junk.mp4: not a readable video") as e:
    images.pixels(str(junk), 32, frames=4)
  assert e.value.reason == "unreadable_image"
  whole = video_clips.write(tmp_path / "whole.mp4", 12).read_bytes()
  (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) // 2])   # mp4's index (moov) is written last: gone
  with pytest.raises(images.BadImage, match="cut.mp4"):
    images.pixels(str(tmp_path / "cut.mp4"), 32, frames=4)
  with pytest.raises(images.BadImage, match="nowhere.mp4: no such video file") as e:
    images.pixels(str(tmp_path / "nowhere.mp4"), 32, frames=4)
  assert e.value.reason == "missing_image"
