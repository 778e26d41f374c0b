"""What every reader shares: annotation files loaded with errors that name the file, the line or record and the
field; paths; video frame listings; the record dict."""
import json
import os
import re
from typing import Iterator, Sequence

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
  """UTF-8 text, or a ValueError naming the file, the line, the byte's column and its offset in `data`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    lineno = first_line + data.count(b"\n", 0, e.start)
    raise ValueError(f"{path}: line {lineno}, byte {e.start - line_start + 1} of the line: not UTF-8 (byte "
                     f"0x{data[e.start]:02x}: {e.reason}); re-save the file as UTF-8") from None


def load_json(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:
    text = decode_utf8(f.read(), path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line; lines end at "\n" (JSON Lines)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte is reported with its line
    for lineno, raw in enumerate(f, 1):
      line = decode_utf8(raw, path, lineno)
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
      yield lineno, expect(obj, dict, path, f"line {lineno}")


def expect(value, kind, path: str, where: str):
  if not isinstance(value, kind):
    want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ValueError(f"{path}: {where}: expected {want}, got {type(value).__name__}")
  return value


def field(obj, key, path: str, where: str, kind=None):
  """obj[key], with a ValueError naming the file and record when obj is not an object or lacks the key."""
  expect(obj, dict, path, where)
  if key not in obj:
    raise ValueError(f"{path}: {where}: missing required key {key!r}")
  return obj[key] if kind is None else expect(obj[key], kind, path, f"{where}, key {key!r}")


def as_int(value, path: str, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{path}: {where}: expected an integer id, got {value!r}") from None


def join_path(*parts) -> str:
  return os.path.abspath(os.path.join(*parts))


def first_file(candidates: Sequence[str], what: str) -> str:
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise FileNotFoundError(f"no {what} found; looked for: {', '.join(candidates)}")


def natural_key(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def list_frames(directory: str) -> list[str]:
  """Frame image paths of one video directory in natural order; [] when the directory is missing."""
  if not os.path.isdir(directory):
    return []
  names = sorted((n for n in os.listdir(directory) if n.lower().endswith(FRAME_EXTENSIONS)), key=natural_key)
  return [join_path(directory, n) for n in names]


def make_record(dataset: str, id_, **fields) -> dict:
  return {"id": id_, "dataset": dataset, **{k: v for k, v in fields.items() if v is not None}}


def rosetta_ocr(files: Sequence[str]) -> dict[str, list[str]]:
  """image_id -> OCR tokens from TextVQA_Rosetta_OCR_v0.2_*.json ({"data": [{"image_id", "ocr_tokens", ...}]})."""
  tokens = {}
  for path in files:
    for i, entry in enumerate(field(load_json(path), "data", path, "top level", list)):
      where = f"record {i}"
      image_id = str(field(entry, "image_id", path, where))
      tokens[image_id] = [str(t) for t in field(entry, "ocr_tokens", path, where, list)]
  return tokens
