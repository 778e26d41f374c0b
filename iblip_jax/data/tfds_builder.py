"""Prepared datasets: a reader's records written once as a tensorflow-datasets dataset of ArrayRecord shards, and
read back with random access through `tfds.data_source`, as a grain MapDataset that feeds the same pipeline.

Why: readers parse annotation files and leave images as paths on one machine's disk. A pod job wants a few large
files that every worker can index into (grain's global shuffle and its resumable iterator state need random
access), wherever they are stored. Preparing reads every image file once and stores its encoded bytes unchanged, so
that odd images (EXIF rotation, 16-bit PNG, CMYK) reach preprocess.to_rgb exactly as the file would.

Neither preparing nor reading needs TensorFlow (checked with tensorflow-datasets 4.9.10: a GeneratorBasedBuilder
writes ArrayRecord with numpy only; tfds' AdhocBuilder does not, it tests its input against tf.data). Preparing
needs `importlib_resources` (tfds imports it to locate the code of a builder defined in a package, but declares it
only for Python < 3.9): the `prepare` extra has it. Reading needs neither.

The feature dict is inferred per dataset, because record fields differ (captions; question + answers; candidates
+ answer_index; ...), in a first pass over the annotations (no image is opened):
  str -> Text, int -> int64, float -> float64, bool -> bool, a list of str or of int -> a Sequence of those;
  any other field (nested, None, types that differ between records) -> Text holding JSON, named "<field>__json";
  "__absent__" lists the fields a record lacks (a test split's answers), so a record comes back with exactly the
  reader's fields; "image" holds the image file's bytes, "frames" the frame files' bytes (video).
A record whose image or frames are missing is left out and counted (it could never be used).

  python -m iblip_jax.data.tfds_builder --dataset coco_caption --source /data/coco --data_dir /data/tfds \
      [--splits train,val] [--name coco_caption] [--arg image_dir=/data/coco/images] [--overwrite]

then, in a config: config.data.datasets.coco = dict(format="coco_caption", tfds_data_dir="/data/tfds",
split="train", weight=1.0) (`tfds_name`, default the format, names the prepared dataset).
"""
from __future__ import annotations   # tfds in annotations is not imported when the module is

import argparse
import collections
import functools
import importlib.util
import inspect
import io
import json
import logging
import os
import tempfile
import time
import types
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from iblip_jax.data import images, readers, video_files
from iblip_jax.extras import require



class _LazyTfds:
  """tensorflow_datasets, imported at its first use: the modules that import this one (sources, shards) also read
  JSONL, folders and tars, and inference imports them, none of which needs tfds; preparing a dataset or reading a
  prepared one does (the `prepare` extra), and says so."""

  def __getattr__(self, name):
    return getattr(require("tensorflow_datasets", "prepare",
                           "preparing or reading tensorflow-datasets ArrayRecord datasets"), name)


tfds = _LazyTfds()

log = logging.getLogger(__name__)

VERSION = "1.0.0"
ABSENT = "__absent__"
JSON = "__json"
MEDIA = ("image", "frames")


# ---------------------------------------------------------------------------------------------------------------------
# Schema: one kind per field, from every record of the dataset.


def _kind(value) -> str:
  if type(value) in (str, int, float, bool):  # exact types: a bool is not stored as an int
    return type(value).__name__
  if isinstance(value, list):
    kinds = {_kind(v) for v in value}
    if not kinds:
      return "list"
    if kinds in ({"str"}, {"int"}):
      return f"list_{kinds.pop()}"
  return "json"


def _merge(a: str | None, b: str) -> str:
  if a is None or a == b:
    return b
  if {a, b} in ({"list", "list_str"}, {"list", "list_int"}):  # an empty list fits either list kind
    return a if b == "list" else b
  return "json"


def infer_schema(records: Iterable[dict]) -> tuple[dict[str, str], set[str]]:
  """(field -> kind: "str", "int", "float", "bool", "list_str", "list_int" or "json", over all records; the media
  fields present). One streaming pass: a 14M-record annotation file is not held twice."""
  schema, media = {}, set()
  for r in records:
    for key, value in r.items():
      if key in MEDIA:
        media.add(key)
      else:
        schema[key] = _merge(schema.get(key), _kind(value))
  return {k: ("list_str" if v == "list" else v) for k, v in sorted(schema.items())}, media


def _feature(kind: str):
  text, int64 = tfds.features.Text(), tfds.features.Scalar(dtype=np.int64)
  return {"str": text, "json": text, "int": int64, "float": tfds.features.Scalar(dtype=np.float64),
          "bool": tfds.features.Scalar(dtype=np.bool_), "list_str": tfds.features.Sequence(text),
          "list_int": tfds.features.Sequence(int64)}[kind]


def _name(field: str, kind: str) -> str:
  return field + JSON if kind == "json" else field


def features(schema: Mapping[str, str], media: str) -> tfds.features.FeaturesDict:
  """media: "image" (one encoded image per record) or "frames" (a list of encoded frames)."""
  encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
  out = {_name(f, k): _feature(k) for f, k in schema.items()}
  out[media] = encoded if media == "image" else tfds.features.Sequence(encoded)
  out[ABSENT] = tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict(out)


def schema_of(feats: tfds.features.FeaturesDict) -> dict[str, str]:
  """The schema back from a prepared dataset's features (the inverse of `features`)."""
  schema = {}
  for name, f in feats.items():
    if name in MEDIA or name == ABSENT:
      continue
    if name.endswith(JSON):
      schema[name[:-len(JSON)]] = "json"
    elif isinstance(f, tfds.features.Sequence):
      schema[name] = "list_str" if isinstance(f.feature, tfds.features.Text) else "list_int"
    elif isinstance(f, tfds.features.Text):
      schema[name] = "str"
    else:
      schema[name] = {np.dtype(np.int64): "int", np.dtype(np.float64): "float",
                      np.dtype(np.bool_): "bool"}[np.dtype(f.np_dtype)]
  return schema


# ---------------------------------------------------------------------------------------------------------------------
# Records <-> examples.

_DEFAULTS = {"str": "", "json": "null", "int": 0, "float": 0.0, "bool": False, "list_str": [], "list_int": []}


def _read_bytes(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def _png(image) -> bytes:
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def encode(record: dict, schema: Mapping[str, str], media: str) -> dict | str:
  """record -> a tfds example, or the reason it is left out."""
  if media == "image":
    data = record.get("image")
    data = _read_bytes(data) if isinstance(data, str) else None
    if data is None:
      return "missing_image"
  elif video_files.is_video_file(record.get("frames")):   # an original clip: the frames a video input uses, as PNG
    try:
      data = [_png(frame) for frame in images.video_frames(record["frames"], video_files.FRAMES)]
    except images.BadImage:
      return "missing_frames"
  else:
    data = [_read_bytes(p) for p in record.get("frames") or []]
    if not data or any(d is None for d in data):
      return "missing_frames"
  example = {media: data, ABSENT: sorted(f for f in schema if f not in record)}
  for field, kind in schema.items():
    if field not in record:
      example[_name(field, kind)] = _DEFAULTS[kind]
    else:
      example[_name(field, kind)] = json.dumps(record[field]) if kind == "json" else record[field]
  return example


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_DECODERS: dict[str, Callable] = {
    "str": _str, "json": lambda v: json.loads(_str(v)), "int": int, "float": float, "bool": bool,
    "list_str": lambda v: [_str(x) for x in v], "list_int": lambda v: [int(x) for x in v]}


def decode(example: dict, schema: Mapping[str, str]) -> dict:
  """A tfds example (numpy values) -> the reader's record, with "image" (bytes) or "frames" (list of bytes)."""
  absent = {_str(f) for f in example[ABSENT]}
  record = {f: _DECODERS[k](example[_name(f, k)]) for f, k in schema.items() if f not in absent}
  if "image" in example:
    record["image"] = bytes(example["image"])
  else:
    record["frames"] = [bytes(x) for x in example["frames"]]
  return record


def open_media(record: dict) -> dict:
  """Encoded bytes -> PIL images (decoded lazily), for code that takes images rather than files (the evaluator)."""
  out = dict(record)
  if isinstance(out.get("image"), bytes):
    out["image"] = Image.open(io.BytesIO(out["image"]))
  if out.get("frames") and isinstance(out["frames"][0], bytes):
    out["frames"] = [Image.open(io.BytesIO(f)) for f in out["frames"]]
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Writing: a GeneratorBasedBuilder over any reader.


@functools.cache
def _builder_class() -> type:
  """The base of every prepared dataset's builder class, defined at first use (its base class is tfds')."""

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One prepared dataset; `name` is set per dataset by `make_builder` (tfds takes it from the class)."""
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Records of an iblip_jax reader, images as their files' bytes."}

    def __init__(self, *, read: Callable[[str], Iterable[dict]], splits: Sequence[str], schema: Mapping[str, str],
                 media: str, description: str, **kwargs):
      self._read, self._splits, self._schema, self._media = read, tuple(splits), dict(schema), media
      self._description = description
      self.left_out = {s: collections.Counter() for s in self._splits}
      self.written = collections.Counter()
      self.reused = False  # set by prepare: the dataset was there already and is kept
      super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      # Records are stored in tfds' order (a hash of their index): with disable_shuffling, tfds 4.9.10 puts small
      # integer keys all in one of its on-disk buckets and sorts that bucket in memory, i.e. the whole dataset at
      # once. Training shuffles anyway, and evaluation output is keyed by record id.
      return tfds.core.DatasetInfo(builder=self, description=self._description,
                                   features=features(self._schema, self._media))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
      for i, record in enumerate(self._read(split)):
        example = encode(record, self._schema, self._media)
        if isinstance(example, str):
          self.left_out[split][example] += 1
          continue
        self.written[split] += 1
        yield i, example

  return _Builder


def _reader(dataset: str, source: str, reader_args: Mapping | None) -> tuple[Callable[[str | None], Iterable[dict]],
                                                                            str | None]:
  """split -> records, and the reader's default split (None for readers without one, e.g. jsonl)."""
  if dataset not in readers.READERS:
    raise ValueError(f"no reader for dataset {dataset!r}; known: {', '.join(sorted(readers.READERS))}")
  fn = readers.READERS[dataset]
  param = inspect.signature(fn).parameters.get("split")
  default = None if param is None else param.default
  args = dict(reader_args or {})

  def read(split):
    return fn(source, **args) if split is None else fn(source, split=split, **args)
  return read, default


def make_builder(dataset: str, source: str, data_dir: str, *, splits: Sequence[str] | None = None,
                 name: str | None = None, reader_args: Mapping | None = None) -> "tfds.core.GeneratorBasedBuilder":
  """A builder for `dataset`'s reader over `source`. splits: the reader's split names (each one a tfds split of
  the same name); default the reader's default split ("train" for readers without splits, e.g. jsonl)."""
  read, default = _reader(dataset, source, reader_args)
  if splits and default is None:
    raise ValueError(f"the {dataset} reader has no split argument: leave splits out (one split, 'train')")
  reader_splits = list(splits or [default])
  names = [s or "train" for s in reader_splits]
  by_name = dict(zip(names, reader_splits))
  t0 = time.perf_counter()
  schema, media = {}, set()
  for s in reader_splits:  # first pass: annotations only, to fix the feature dict
    split_schema, split_media = infer_schema(read(s))
    media |= split_media
    for field, kind in split_schema.items():
      schema[field] = _merge(schema.get(field), kind)
  if len(media) != 1:
    raise ValueError(f"{dataset} at {source}: records must all carry 'image' or all 'frames', found {sorted(media)}")
  log.info("%s: schema from the annotations in %.1fs: %s", dataset, time.perf_counter() - t0,
           ", ".join(f"{f}:{k}" for f, k in schema.items()))
  if importlib.util.find_spec("importlib_resources") is None:  # tfds needs it to locate a builder's code
    raise ModuleNotFoundError("preparing needs importlib_resources, which tensorflow-datasets imports without "
                              "declaring it: pip install 'iblip_jax[prepare]' (or importlib_resources)")
  cls = types.new_class(f"Prepared_{name or dataset}", (_builder_class(),), {"skip_registration": True},
                        lambda ns: ns.update(name=name or dataset, __module__=__name__))
  description = f"iblip_jax reader {dataset!r} over {os.path.abspath(source)}, splits {names}, args {reader_args}"
  return cls(read=lambda split: read(by_name[split]), splits=names, schema=schema, media=media.pop(),
             description=description, data_dir=data_dir, file_format="array_record")


def prepare(dataset: str, source: str, data_dir: str, *, splits: Sequence[str] | None = None,
            name: str | None = None, reader_args: Mapping | None = None,
            overwrite: bool = False) -> "tfds.core.GeneratorBasedBuilder":
  """Writes the prepared dataset under {data_dir}/{name}/{VERSION}/ (an existing one is kept unless overwrite)."""
  builder = make_builder(dataset, source, data_dir, splits=splits, name=name, reader_args=reader_args)
  builder.reused = builder.is_prepared() and not overwrite
  mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else \
      tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep tfds' empty folders out of data_dir
    builder.download_and_prepare(download_dir=downloads,
                                 download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


# ---------------------------------------------------------------------------------------------------------------------
# Reading: a grain MapDataset of records (no TensorFlow).


def data_source(data_dir: str, name: str, split: str = "train") -> grain.MapDataset:
  """The prepared dataset's split as records (image bytes), lazily decoded, random access."""
  src = tfds.data_source(name, data_dir=data_dir, split=split)
  return grain.MapDataset.source(src).map(functools.partial(decode, schema=schema_of(src.dataset_info.features)))


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=sorted(readers.READERS), help="the reader to use")
  parser.add_argument("--source", required=True, help="what the reader reads (its root directory, or a JSONL file)")
  parser.add_argument("--data_dir", required=True, help="tfds data_dir the prepared dataset goes to")
  parser.add_argument("--splits", default="", help="comma list of the reader's splits (default: its default split)")
  parser.add_argument("--name", default="", help="tfds dataset name (default: --dataset)")
  parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                      help="reader keyword argument (VALUE parsed as JSON when it is, else a string); repeatable")
  parser.add_argument("--overwrite", action="store_true", help="rebuild an existing prepared dataset")
  args = parser.parse_args(argv)
  reader_args = {}
  for item in args.arg:
    key, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--arg {item!r}: expected KEY=VALUE")
    reader_args[key] = _value(value)
  t0 = time.perf_counter()
  builder = prepare(args.dataset, args.source, args.data_dir, splits=[s for s in args.splits.split(",") if s],
                    name=args.name or None, reader_args=reader_args, overwrite=args.overwrite)
  if builder.reused:
    print(f"{builder.data_dir} was prepared before and is kept (--overwrite rebuilds it)")
    return
  for split, left_out in builder.left_out.items():
    print(f"{builder.name}/{split}: {builder.written[split]} records written"
          + (", left out: " + ", ".join(f"{k} {v}" for k, v in sorted(left_out.items())) if left_out else ""))
  print(f"{builder.data_dir} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
  main()
