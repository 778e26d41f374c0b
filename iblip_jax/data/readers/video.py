"""Video QA datasets: MSVD-QA, MSRVTT-QA, iVQA, from pre-extracted frames or from the original clips.

A record's "frames" is the clip's extracted frame files (a folder per clip) when there are any, else the path of
its original video file when one is found (decoded when used: data/video_files.py), else [] (skipped, counted)."""
import collections
import csv
import glob
import os
from typing import Iterator, Sequence

from iblip_jax.data import video_files
from iblip_jax.data.readers.files import as_int, expect, field, list_frames, load_json, make_record

# Ranking candidates of the video QA sets when no answer-list file is given: the most frequent train answers, as many
# as LAVIS's lists hold (train_ans2label.json, from ALPRO): 1,500 for MSRVTT-QA (all-in-one's loader and ALPRO's
# config say 1,500) and 2,423 for MSVD-QA (ALPRO config, LAVIS #333). Uncertain: that those lists are exactly the
# top-k train answers (ties here keep first-seen order); the paper states no candidate set.
MSVD_TOP_K = 2423
MSRVTT_TOP_K = 1500
# Where MSR-VTT's release puts video<N>.mp4: one folder, or split into its train/val and test archives.
MSRVTT_VIDEO_DIRS = ("videos", os.path.join("videos", "all"), "TrainValVideo", "TestVideo")


def read_msvd_qa(root: str, split: str = "test", frames_dir: str | None = None, videos_dir: str | None = None,
                 answer_vocab: str | Sequence[str] | None = None,
                 top_k: int | None = MSVD_TOP_K) -> Iterator[dict]:
  """MSVD-QA (github.com/xudejing/video-question-answering): {root}/{split}_qa.json, a list of {"id", "video_id"
  (N), "question", "answer"}, and {root}/youtube_mapping.txt, lines "<youtube clip name> vid<N>". Frames at
  {frames_dir}/<youtube clip name>/ (the clip's YouTubeClips/<name>.avi, extracted), frames_dir defaulting to
  {root}/frames. Ranking candidates: see _answer_vocab."""
  mapping = _youtube_mapping(os.path.join(root, "youtube_mapping.txt"))
  frames_dir = frames_dir or os.path.join(root, "frames")
  videos_dir = videos_dir or os.path.join(root, "YouTubeClips")

  def clip(video_id, path, where):
    name = mapping.get(f"vid{as_int(video_id, path, where)}")
    if name is None:
      raise ValueError(f"{path}: {where}: video_id {video_id!r} has no vid{video_id} line in youtube_mapping.txt")
    return _frames_or_video(os.path.join(frames_dir, name), [os.path.join(videos_dir, name)])

  return _read_video_qa(root, split, "msvd_qa", clip, answer_vocab, top_k)


def read_msrvtt_qa(root: str, split: str = "test", frames_dir: str | None = None, videos_dir: str | None = None,
                   answer_vocab: str | Sequence[str] | None = None,
                   top_k: int | None = MSRVTT_TOP_K) -> Iterator[dict]:
  """MSRVTT-QA (github.com/xudejing/video-question-answering): {root}/{split}_qa.json, a list of {"id", "video_id"
  (N), "question", "answer", "category_id"}. Frames at {frames_dir}/video<N>/ (MSR-VTT's video<N>.mp4, extracted),
  frames_dir defaulting to {root}/frames; else the clip itself, video<N>.mp4 in videos_dir (default: {root}/videos,
  videos/all, TrainValVideo or TestVideo). Ranking candidates: see _answer_vocab."""
  frames_dir = frames_dir or os.path.join(root, "frames")
  videos_dirs = [videos_dir] if videos_dir else [os.path.join(root, d) for d in MSRVTT_VIDEO_DIRS]

  def clip(video_id, path, where):
    name = f"video{as_int(video_id, path, where)}"
    return _frames_or_video(os.path.join(frames_dir, name), [os.path.join(d, name) for d in videos_dirs])

  return _read_video_qa(root, split, "msrvtt_qa", clip, answer_vocab, top_k)


def _frames_or_video(frame_dir: str, stems: list[str]):
  """The clip's extracted frames if `frame_dir` has any, else the first existing video file among `stems` + each
  video extension (the original clip), else []."""
  frames = list_frames(frame_dir)
  if frames:
    return frames
  return next((stem + ext for stem in stems for ext in video_files.EXTENSIONS if os.path.isfile(stem + ext)), [])


def _read_video_qa(root, split, dataset, clip, answer_vocab, top_k) -> Iterator[dict]:
  path = os.path.join(root, f"{split}_qa.json")
  items = expect(load_json(path), list, path, "top level")
  vocab = _answer_vocab(root, answer_vocab, top_k)
  index = {a: i for i, a in enumerate(vocab or ())}
  for i, item in enumerate(items):
    where = f"record {i}"
    answer = field(item, "answer", path, where, str)
    yield make_record(dataset, field(item, "id", path, where),
                      frames=clip(field(item, "video_id", path, where), path, where),
                      question=field(item, "question", path, where, str), answer=answer, candidates=vocab,
                      answer_index=index.get(answer, -1) if vocab else None)


def _answer_vocab(root: str, answer_vocab, top_k: int | None) -> list[str] | None:
  """The candidate answers for ranking. Uncertain: the paper does not give its MSVD/MSRVTT candidate set. In order:
  `answer_vocab` (a list, or a JSON file: list, or {answer: index} as LAVIS's train_ans2label.json / just-ask's
  vocab.json); else such a file in root (train_ans2label.json, qa_ans2label.json, vocab.json); else the `top_k`
  most frequent answers of {root}/train_qa.json (LAVIS's list sizes, MSVD_TOP_K / MSRVTT_TOP_K; None: all of them),
  most frequent first; else None (records then carry no candidates). Answers outside the set get answer_index -1
  (always wrong, as in just-ask and ALPRO)."""
  if answer_vocab is None:
    found = [p for p in (os.path.join(root, n) for n in ("train_ans2label.json", "qa_ans2label.json", "vocab.json"))
             if os.path.isfile(p)]
    if found:
      answer_vocab = found[0]
    elif os.path.isfile(os.path.join(root, "train_qa.json")):
      path = os.path.join(root, "train_qa.json")
      items = expect(load_json(path), list, path, "top level")
      counts = collections.Counter(field(x, "answer", path, f"record {i}", str) for i, x in enumerate(items))
      return [a for a, _ in counts.most_common(top_k)]
    else:
      return None
  if not isinstance(answer_vocab, str):
    return list(answer_vocab)
  vocab = expect(load_json(answer_vocab), (list, dict), answer_vocab, "top level")
  return list(vocab) if isinstance(vocab, list) else sorted(vocab, key=vocab.get)


def _youtube_mapping(path: str) -> dict[str, str]:
  """"vid<N>" -> YouTube clip name, from MSVD's youtube_mapping.txt ("<clip name> vid<N>" per line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: MSVD video-name mapping not found")
  mapping = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].startswith("vid"):
        raise ValueError(f"{path}: line {lineno}: expected '<clip name> vid<N>', got {line.strip()!r}")
      mapping[parts[1]] = parts[0]
  return mapping


IVQA_COLUMNS = ("video_id", "question", "answer1", "answer2", "answer3", "answer4", "answer5")


def read_ivqa(root: str, split: str = "test", frames_dir: str | None = None,
              videos_dir: str | None = None) -> Iterator[dict]:
  """iVQA (github.com/antoyang/just-ask): {root}/{split}.csv with columns video_id (the YouTube id), question,
  answer1..answer5 (5 annotators; the iVQA metric counts matches). Frames at {frames_dir}/<clip>/, frames_dir
  defaulting to {root}/frames, where <clip> is the video_id or, when the CSV has start/end columns,
  "<video_id>_<start>_<end>", else the one directory named "<video_id>_*"; without frames, the clip itself,
  <clip>.mp4 (or another video extension) in videos_dir (default {root}/videos). Uncertain: the released clips' file
  naming (just-ask maps feature files to rows by their first 11 characters, the YouTube id)."""
  path = os.path.join(root, f"{split}.csv")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  frames_dir = frames_dir or os.path.join(root, "frames")
  videos_dir = videos_dir or os.path.join(root, "videos")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in IVQA_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: line 1: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
    for row_index, row in enumerate(reader):
      where = f"line {reader.line_num}"
      if None in row or any(row[c] is None for c in IVQA_COLUMNS):  # too many / too few fields on the line
        raise ValueError(f"{path}: {where}: expected {len(reader.fieldnames)} fields")
      answers = [row[f"answer{k}"].strip() for k in range(1, 6) if row[f"answer{k}"].strip()]
      clip = os.path.basename(_ivqa_clip_dir(frames_dir, row))
      yield make_record("ivqa", row_index, frames=_frames_or_video(os.path.join(frames_dir, clip),
                                                                    [os.path.join(videos_dir, clip),
                                                                     os.path.join(videos_dir, row["video_id"].strip())]),
                        question=row["question"], answers=answers)


def _ivqa_clip_dir(frames_dir: str, row: dict) -> str:
  video_id = row["video_id"].strip()
  candidates = [os.path.join(frames_dir, video_id)]
  if row.get("start") and row.get("end"):
    candidates.append(os.path.join(frames_dir, f"{video_id}_{row['start'].strip()}_{row['end'].strip()}"))
  for c in candidates:
    if os.path.isdir(c):
      return c
  matches = glob.glob(os.path.join(glob.escape(frames_dir), glob.escape(video_id) + "_*"))
  return matches[0] if len(matches) == 1 else candidates[-1]
