"""What every reader shares: annotation files loaded with errors that name the file, the line or record and the
field; paths; video frame listings; the record dict."""
import json
import os
import re
from typing import Iterator, Sequence

from iblip_jax.errors import UserError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_LISTED = 10   # bad lines named in one error; the rest are counted


class AnnotationError(UserError):
  """An annotation file that cannot be read as its format says; the message names the file, the line or record and
  what is wrong (for a JSON Lines file, every bad line: the first MAX_LISTED, and a count)."""


class BadLines:
  """A JSON Lines file's bad lines, collected so that one error names them all instead of one per rerun."""

  def __init__(self, path: str):
    self.path, self.lines = path, []

  def add(self, message: str) -> None:
    self.lines.append(message.removeprefix(f"{self.path}: "))

  def check(self) -> None:
    if len(self.lines) == 1:
      raise AnnotationError(f"{self.path}: {self.lines[0]}")
    if self.lines:
      shown = "\n  ".join(self.lines[:MAX_LISTED])
      more = f"\n  ... and {len(self.lines) - MAX_LISTED} more" if len(self.lines) > MAX_LISTED else ""
      raise AnnotationError(f"{self.path}: {len(self.lines)} bad lines:\n  {shown}{more}")


# json's messages for what a cut or split line looks like, said plainly
_JSON_HINTS = {"Unterminated string starting at": "a string that is never closed: is the line cut short?",
               "Invalid control character at": "a control character (a raw line break?) inside a string: is the line "
                                               "cut in two?",
               "Expecting value": "no JSON value there", "Extra data": "more after the JSON object: two on one line?"}


def json_error(path: str, e: json.JSONDecodeError, line_offset: int | None = None, lineno: int | None = None) -> str:
  """A whole file: '{path}: line L, column C: malformed JSON (what, plainly; byte B)'. One line of a JSON Lines file
  (`line_offset`, where it starts in the file): '{path}: line L: malformed JSON (what; column C, byte B of the
  file)'."""
  what = next((hint for key, hint in _JSON_HINTS.items() if e.msg.startswith(key)), e.msg)
  if line_offset is None:
    return f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({what}; byte {e.pos})"
  return f"{path}: line {lineno}: malformed JSON ({what}; column {e.colno}, byte {line_offset + e.pos} of the file)"


def decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
  """UTF-8 text, or an AnnotationError naming the file, the line, the byte's column and its offset in `data`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    lineno = first_line + data.count(b"\n", 0, e.start)
    raise AnnotationError(f"{path}: line {lineno}, byte {e.start - line_start + 1} of the line: not UTF-8 (byte "
                     f"0x{data[e.start]:02x}: {e.reason}); re-save the file as UTF-8") from None


def load_json(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:
    text = decode_utf8(f.read(), path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise AnnotationError(json_error(path, e)) from None


def iter_jsonl(path: str, bad: BadLines | None = None) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each good non-blank line; lines end at "\n" (JSON Lines). Bad lines (not UTF-8, not
  JSON, not an object) go to `bad`; without one, an AnnotationError names them all after the last line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  own, bad = bad is None, bad or BadLines(path)
  offset = 0
  with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte is reported with its line
    for lineno, raw in enumerate(f, 1):
      start, offset = offset, offset + len(raw)
      try:
        line = decode_utf8(raw, path, lineno)
        if not line.strip():
          continue
        try:
          obj = json.loads(line.rstrip("\r\n"))   # the line break ends the line, not a string cut short in it
        except json.JSONDecodeError as e:
          raise AnnotationError(json_error(path, e, start, lineno)) from None
        yield lineno, expect(obj, dict, path, f"line {lineno}")
      except AnnotationError as e:
        bad.add(str(e))
  if own:
    bad.check()


def expect(value, kind, path: str, where: str):
  if not isinstance(value, kind):
    want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise AnnotationError(f"{path}: {where}: expected {want}, got {type(value).__name__}")
  return value


def field(obj, key, path: str, where: str, kind=None):
  """obj[key], with an AnnotationError naming the file and record when obj is not an object or lacks the key."""
  expect(obj, dict, path, where)
  if key not in obj:
    raise AnnotationError(f"{path}: {where}: missing required key {key!r}")
  return obj[key] if kind is None else expect(obj[key], kind, path, f"{where}, key {key!r}")


def as_int(value, path: str, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise AnnotationError(f"{path}: {where}: expected an integer id, got {value!r}") from None


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
