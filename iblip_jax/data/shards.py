"""Bulk inputs for annotation (run/annotate.py): which shards an input spec names, and each shard's records as a
stream, local or gs://.

A spec is a comma list of globs, files and folders. What each becomes:
  *.tar, *.tar.gz, *.tgz   one shard: a webdataset tar as img2dataset writes it ({key}.jpg|jpeg|png|webp|bmp, and
                           optional {key}.txt / {key}.json beside it; members of one key are consecutive). Read as a
                           stream, never extracted or held whole.
  *.jsonl, *.csv           one shard: rows {"image": path, "prompt"?: text, "key"?: text} (CSV: a header with those
                           columns; JSONL may give {"images": [path, ...]}, several images for one prompt). Relative
                           image paths are relative to the file; gs:// paths are read from there.
  a folder                 its image files, recursively and sorted, in shards of FOLDER_SHARD files (so that a huge
                           folder splits over hosts and resumes in parts); a folder of tars or JSONL files is those.
  a prepared dataset       a tensorflow-datasets version folder written by data/tfds_builder.py (dataset_info.json
                           and ArrayRecord files): every split, in shards of FOLDER_SHARD records read by index
                           (random access), keyed "<split>/<index>", the record's other fields as meta.
A shard's records come in a fixed order, each with a key unique in the shard. Whatever is wrong with one record (a
member that is not an image, a missing file, a cut tar) is that record's `error`, never the job's: a tar that
breaks off midway ends with one error record saying where. A shard that cannot be opened at all raises
UnreadableShard (the caller reports it and retries it on the next run).
"""
import csv
import dataclasses
import functools
import glob
import gzip
import io
import json
import os
import tarfile
import zlib
from typing import Iterator

from etils import epath

from iblip_jax.data import tfds_builder
from iblip_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
TABLE_EXTENSIONS = (".jsonl", ".csv")
FOLDER_SHARD = 1000


class UnreadableShard(Exception):
  """A shard that cannot be opened or listed (gone, no permission, a network error): retried on the next run."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """`name`: unique over the job, used for its output files; `path`: the file (or the folder for a folder's part);
  `files`: a folder part's image files; `size`: bytes, for progress (0 when unknown)."""
  name: str
  path: str
  kind: str            # "tar" | "jsonl" | "csv" | "folder" | "tfds"
  files: tuple[str, ...] = ()
  size: int = 0
  split: str = ""      # "tfds": the split, and the records [start, stop) of it
  start: int = 0
  stop: int = 0


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a shard: `image` is the encoded bytes or a path (local or gs://), or a JSONL row's list of paths
  (several images for one prompt); `prompt` a row's own prompt (None: the job's prompts); `meta` what the shard says
  of it (a tar's .txt / .json); `error` why it cannot be used."""
  key: str
  image: bytes | str | list[str] | None = None
  prompt: str | None = None
  meta: dict | None = None
  error: str | None = None
  nbytes: int = 0      # input bytes this record accounts for (progress)


def _is(path: str, extensions) -> bool:
  return path.lower().endswith(extensions)


def _expand(part: str) -> list[str]:
  """One comma-separated part of a spec -> paths (a glob's matches, sorted; a file; a folder)."""
  if any(c in part for c in "*?["):
    if part.startswith("gs://"):
      bucket, _, pattern = part[len("gs://"):].partition("/")
      found = sorted(str(p) for p in epath.Path(f"gs://{bucket}").glob(pattern))
    else:
      found = sorted(glob.glob(part, recursive=True))
    if not found:
      raise UserError(f"config.annotate.inputs: {part!r} matches nothing")
    return found
  if not epath.Path(part).exists():
    raise UserError(f"config.annotate.inputs: {part!r}: no such file or folder")
  return [part]


def _walk(folder: str) -> list[str]:
  """Every file under `folder`, recursively, sorted."""
  if not folder.startswith("gs://"):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)
  out, todo = [], [epath.Path(folder)]
  while todo:   # epath refuses "**" on gs:// (one listing per folder instead)
    for p in todo.pop().iterdir():
      (todo if p.is_dir() else out).append(p)
  return sorted(str(p) for p in out)


def find(spec: str, folder_shard: int = FOLDER_SHARD) -> list[Shard]:
  """The shards of an input spec (module docstring), in a fixed order, with names unique over the job: each shard's
  path relative to the inputs' common folder ("/" as "__"), a folder's parts suffixed ".part-00003"."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise UserError("config.annotate.inputs is empty: name webdataset tars, JSONL/CSV files or image folders "
                    "(a glob or a comma list, local or gs://)")
  found: list[tuple[str, str, tuple[str, ...], str]] = []   # (path, kind, files, part suffix)
  prepared: list[Shard] = []
  for part in parts:
    for path in _expand(part):
      if epath.Path(path).is_dir() and (epath.Path(path) / "dataset_info.json").exists():
        prepared += _tfds_shards(path.rstrip("/"), folder_shard)
      elif epath.Path(path).is_dir():
        path = path.rstrip("/")
        files = _walk(path)
        tables = [f for f in files if _is(f, TAR_EXTENSIONS + TABLE_EXTENSIONS)]
        images = [f for f in files if _is(f, IMAGE_EXTENSIONS)]
        found += [(f, _kind(f), (), "") for f in tables]
        found += [(path, "folder", tuple(images[i:i + folder_shard]), f".part-{i // folder_shard:05d}")
                  for i in range(0, len(images), folder_shard)]
        if not tables and not images:
          raise UserError(f"config.annotate.inputs: the folder {path!r} holds no tars, JSONL/CSV files or images")
      elif _kind(path):
        found.append((path, _kind(path), (), ""))
      else:
        raise UserError(f"config.annotate.inputs: {path!r} is not a webdataset tar (.tar, .tar.gz, .tgz), a JSONL "
                        f"or CSV file of {{image, prompt}} rows, or a folder")
  ids = [p + suffix for p, _, _, suffix in found]
  if len(set(ids)) != len(ids):
    raise UserError("config.annotate.inputs names some shards twice: "
                    + ", ".join(sorted({p for p in ids if ids.count(p) > 1})[:5]))
  out = _named(found) + prepared
  names = [sh.name for sh in out]
  if len(set(names)) != len(names):   # e.g. a/b.tar and a__b.tar: their outputs would be one shard's
    raise UserError("config.annotate.inputs: shards whose output names collide: "
                    + ", ".join(sorted({n for n in names if names.count(n) > 1})[:5])
                    + "; rename them, or annotate them into separate output folders")
  return out


def _named(found: list[tuple[str, str, tuple[str, ...], str]]) -> list[Shard]:
  # names: paths relative to the folder that holds them all ("/" as "__"), so that equal file names in different
  # folders stay apart and a name does not change with where the dataset is mounted
  local = lambda p: p.replace("gs://", "gs:/", 1)
  if not found:
    return []
  try:
    common = os.path.commonpath([os.path.dirname(local(os.path.abspath(p) if "://" not in p else p))
                                 for p, _, _, _ in found])
  except ValueError:   # gs:// and local paths together: no common folder
    common = ""
  out = []
  for path, kind, files, suffix in found:
    where = local(os.path.abspath(path) if "://" not in path else path)
    name = (os.path.relpath(where, common) if common else where.replace(":", "")).replace("/", "__") + suffix
    # a gs:// folder's files are not each asked for their size (one request apiece): its progress has no total
    size = (0 if path.startswith("gs://") else sum(_size(f) for f in files)) if kind == "folder" else _size(path)
    out.append(Shard(name, path, kind, files, size))
  return out


def _tfds_shards(folder: str, per_shard: int) -> list[Shard]:
  """A prepared dataset's splits in shards of `per_shard` records, named "<name>.<version>.<split>.part-NNNNN"."""
  info = _tfds_source(folder, None)
  out = []
  for split, meta in sorted(info.splits.items()):
    n, size = meta.num_examples, meta.num_bytes
    for i, start in enumerate(range(0, n, per_shard)):
      stop = min(start + per_shard, n)
      out.append(Shard(f"{info.name}.{os.path.basename(folder)}.{split}.part-{i:05d}", folder, "tfds",
                       size=size * (stop - start) // max(n, 1), split=split, start=start, stop=stop))
  return out


@functools.lru_cache(maxsize=8)
def _tfds_source(folder: str, split: str | None):
  """The dataset's info (split None) or a split's random-access source; opened once per process."""
  builder = tfds_builder.tfds.builder_from_directory(folder)
  return builder.info if split is None else builder.as_data_source(split=split)


def _tfds(shard: Shard) -> Iterator[Record]:
  try:
    src = _tfds_source(shard.path, shard.split)
    schema = tfds_builder.schema_of(src.dataset_info.features)
  except Exception as e:  # noqa: BLE001 - gone, unreadable, not ours: retried next run
    raise UnreadableShard(f"{shard.path} ({shard.split}): cannot be opened ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
  for i in range(shard.start, shard.stop):
    key = f"{shard.split}/{i}"
    try:
      record = tfds_builder.decode(src[i], schema)
    except Exception as e:  # noqa: BLE001 - one bad record is that record's error
      yield Record(key, error=f"{shard.path}: {key}: cannot be read ({type(e).__name__}: {str(e)[:200]})")
      continue
    meta = {k: v for k, v in record.items() if k not in ("image", "frames")}
    if "image" not in record:
      yield Record(key, meta=meta or None, error=f"{shard.path}: {key}: a video record (frames): annotate takes "
                   "images")
      continue
    yield Record(key, image=record["image"], meta=meta or None,
                 nbytes=shard.size // max(shard.stop - shard.start, 1))


def _kind(path: str) -> str:
  if _is(path, TAR_EXTENSIONS):
    return "tar"
  if _is(path, TABLE_EXTENSIONS):
    return path.lower().rsplit(".", 1)[1]
  return ""


def _size(path: str) -> int:
  try:
    return epath.Path(path).stat().length
  except (OSError, AttributeError):
    try:
      return os.path.getsize(path)
    except OSError:
      return 0


def read(shard: Shard) -> Iterator[Record]:
  """The shard's records in order (module docstring). UnreadableShard when it cannot be opened at all."""
  if shard.kind == "folder":
    return _folder(shard)
  if shard.kind == "tfds":
    return _tfds(shard)
  try:
    f = epath.Path(shard.path).open("rb")
  except Exception as e:  # noqa: BLE001 - any opener's error means the same: retry this shard next time
    raise UnreadableShard(f"{shard.path}: cannot be opened ({type(e).__name__}: {str(e)[:200]})") from None
  return {"tar": _tar, "jsonl": _jsonl, "csv": _csv}[shard.kind](shard, f)


def _folder(shard: Shard) -> Iterator[Record]:
  for path in shard.files:
    key = os.path.relpath(path.replace("gs://", "gs:/", 1), shard.path.replace("gs://", "gs:/", 1))
    yield Record(key, image=path, nbytes=0 if path.startswith("gs://") else _local_size(path))


def _local_size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0


def _tar(shard: Shard, f) -> Iterator[Record]:
  """Groups consecutive members by key (the name up to its first dot after the last slash): an image member makes a
  record, .txt and .json members join it as meta. A cut or corrupt tar ends with an error record naming the offset."""
  key, image, meta, nbytes, last = None, None, {}, 0, 0
  with f:
    try:
      stream = tarfile.open(fileobj=f, mode="r|*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
      if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
        raise UnreadableShard(f"{shard.path}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
      yield Record("#unreadable", error=f"{shard.path}: not a tar file ({type(e).__name__}: {e})",
                   nbytes=shard.size)
      return
    try:
      for member in stream:
        stream.members = []   # tarfile keeps every member's header it has read: 20k of them are 12 MB
        if not member.isfile():
          continue
        base = member.name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        k = member.name[:len(member.name) - len(base)] + stem
        if key is not None and k != key:
          yield _tar_record(shard, key, image, meta, nbytes)
          image, meta, nbytes = None, {}, 0
        key = k
        data = stream.extractfile(member).read()
        at = _position(f)
        nbytes, last = nbytes + at - last, at
        ext = ext.lower()
        if "." + ext in IMAGE_EXTENSIONS:
          image = data
        elif ext == "txt":
          meta["txt"] = data.decode("utf-8", "replace")
        elif ext == "json":
          try:
            meta["json"] = json.loads(data)
          except ValueError:
            meta["json_error"] = "not JSON"
    except OSError as e:
      if not isinstance(e, gzip.BadGzipFile):   # a read that failed (a network error): the shard, next run
        raise UnreadableShard(f"{shard.path}: reading failed after {key!r} ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
      yield from _cut(shard, f, e, key, image, meta, nbytes)
      return
    except (tarfile.TarError, EOFError, ValueError, zlib.error) as e:
      yield from _cut(shard, f, e, key, image, meta, nbytes)
      return
    if key is not None:
      yield _tar_record(shard, key, image, meta, nbytes)


def _cut(shard: Shard, f, e: Exception, key, image, meta: dict, nbytes: int) -> Iterator[Record]:
  """Where a tar breaks off: the record it was in (whole if its image was read) and one error record saying so."""
  cut = (f"{shard.path}: the tar is cut or corrupt at {key!r} ({type(e).__name__}: {str(e)[:200]}); the records "
         "after it cannot be read")
  if key is not None and image is not None:   # the break came after this record's image: it is whole
    yield _tar_record(shard, key, image, meta, nbytes)
    key = None
  yield Record(key if key is not None else f"#cut@{_tell(f)}", meta=meta or None, error=cut)


def _position(f) -> int:
  """Bytes of the file read so far (progress; a compressed tar counts its compressed bytes)."""
  try:
    return f.tell()
  except (OSError, ValueError, AttributeError):
    return 0


def _tell(f) -> str:
  return str(_position(f) or "?")


def _tar_record(shard: Shard, key: str, image, meta: dict, nbytes: int) -> Record:
  if image is None:
    return Record(key, meta=meta or None, error=f"{shard.path}: {key}: no image member "
                  f"({'/'.join(IMAGE_EXTENSIONS)})", nbytes=nbytes)
  return Record(key, image=image, meta=meta or None, nbytes=nbytes)


def _row_record(shard: Shard, where: str, row, nbytes: int) -> Record:
  several = isinstance(row, dict) and "images" in row and "image" not in row
  if several:   # a JSONL row's several images for one prompt (CSV has one "image" column)
    paths = row["images"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
      return Record(where, error=f"{shard.path}: {where}: \"images\" must be a non-empty list of image paths, got "
                    f"{str(paths)[:200]!r}", nbytes=nbytes)
  elif not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
    return Record(where, error=f"{shard.path}: {where}: expected an \"image\" path, got {str(row)[:200]!r}",
                  nbytes=nbytes)
  prompt = row.get("prompt") or None
  if prompt is not None and not isinstance(prompt, str):
    return Record(where, error=f"{shard.path}: {where}: \"prompt\" is not text", nbytes=nbytes)
  image = [_near(shard, p) for p in row["images"]] if several else _near(shard, row["image"])
  return Record(str(row.get("key") or where), image=image, prompt=prompt, nbytes=nbytes)


def _near(shard: Shard, image: str) -> str:
  """A row's image path: relative ones are relative to the shard's file."""
  if not image.startswith("gs://") and not os.path.isabs(image):
    return f"{shard.path.rsplit('/', 1)[0]}/{image}" if "/" in shard.path else image
  return image


def _jsonl(shard: Shard, f) -> Iterator[Record]:
  with f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f"line {lineno}"
      try:
        row = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        yield Record(where, error=f"{shard.path}: {where}: not a JSON object in UTF-8 ({e})", nbytes=len(raw))
        continue
      yield _row_record(shard, where, row, len(raw))


def _csv(shard: Shard, f) -> Iterator[Record]:
  with f:
    text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
    reader = csv.DictReader(text)
    if reader.fieldnames is None or "image" not in reader.fieldnames:
      yield Record("#header", error=f"{shard.path}: a CSV header with an \"image\" column (and optional \"prompt\", "
                   f"\"key\") was expected, got {reader.fieldnames}", nbytes=shard.size)
      return
    for row in reader:
      yield _row_record(shard, f"line {reader.line_num}", row, sum(len(v or "") + 1 for v in row.values()))
