"""Where a dataset's records come from: a reader over the files the user points to, or a prepared tensorflow-datasets
ArrayRecord dataset (iblip_jax.data.tfds_builder). One `Source` per entry of config.data.datasets / config.evals.
"""
import dataclasses
import functools
import inspect
import os

from etils import epath

from iblip_jax.data import mixture, readers, templates, text, tfds_builder
from iblip_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Source:
  name: str                 # the entry's name in the config
  where: str                # "config.data.datasets.<name>": how errors name it
  format: str               # a reader name (iblip_jax.data.readers.READERS)
  path: str = ""            # the reader's root / file
  weight: float = 1.0       # mixture multiplier (training)
  tfds_data_dir: str = ""   # a prepared dataset instead of `path`
  tfds_name: str = ""       # its name there (default: format)
  split: str = "train"      # the prepared dataset's split
  task: str = ""            # the evaluation task (evaluations)
  # keyword arguments of the reader beyond the path (split="val", image_dir=..., ann_file=...); a config's dict is
  # kept as sorted (key, value) pairs so that a Source stays hashable
  reader_args: tuple = ()

  def __post_init__(self):
    args = self.reader_args
    if not isinstance(args, tuple):
      args = args.to_dict() if hasattr(args, "to_dict") else dict(args)
      object.__setattr__(self, "reader_args", tuple(sorted(args.items())))


def _readers():
  return readers.READERS


def problems(source: Source) -> list[str]:
  """What is wrong with an entry (unknown format, nothing at its path), without reading it."""
  out = []
  readers = _readers()
  if source.format not in readers:
    out.append(f"{source.where}.format={source.format!r} is not a known dataset format "
               f"({', '.join(sorted(readers))})")
  if source.tfds_data_dir:
    name = source.tfds_name or source.format
    if not (epath.Path(source.tfds_data_dir) / name).exists():
      out.append(f"{source.where}.tfds_data_dir={source.tfds_data_dir!r}: no prepared dataset {name!r} there "
                 f"(python -m iblip_jax.data.tfds_builder --dataset {source.format} --source ... --data_dir "
                 f"{source.tfds_data_dir})")
  elif not os.path.exists(source.path):
    out.append(f"{source.where}.path={source.path!r} does not exist")
  if source.reader_args and source.format in readers:
    if source.tfds_data_dir:
      out.append(f"{source.where}.reader_args: a prepared dataset (tfds_data_dir) is not read by a reader")
    else:
      try:
        inspect.signature(readers[source.format]).bind(source.path, **dict(source.reader_args))
      except TypeError as e:
        out.append(f"{source.where}.reader_args={dict(source.reader_args)}: {e} (reader {source.format!r})")
  return out


def record_source(source: Source):
  """The entry's records as a grain MapDataset: a prepared tfds dataset (random access, images as bytes) or the
  reader's records in memory. Every record says where it comes from (tag)."""
  if source.tfds_data_dir:
    ds = tfds_builder.data_source(source.tfds_data_dir, source.tfds_name or source.format, source.split)
    if not len(ds):
      raise UserError(f"{source.where}: the prepared dataset in {source.tfds_data_dir} has no records")
    return ds.map(functools.partial(tag, source))
  return mixture.source(read_records(source))


def read_records(source: Source) -> list[dict]:
  """The entry's records as a list (images of prepared datasets opened as PIL images, as the evaluator takes
  them), each tagged with where it comes from."""
  if source.tfds_data_dir:
    return [tfds_builder.open_media(r) for r in record_source(source)]
  records = [tag(source, r) for r in _readers()[source.format](source.path, **dict(source.reader_args))]
  if not records:
    raise UserError(f"{source.where}: {source.path} has no records")
  return records


def tag(source: Source, record: dict) -> dict:
  """The record with "source" (the config's name for its dataset: skips are counted by it) and "source_file" (what
  its messages name): a reader's "dataset" is its format, the same for every JSONL file."""
  return {**record, "source": source.name, "source_file": source.path or source.tfds_data_dir}


def renderer(instruction_format: str = "templates", text_processing: str = "none"):
  """(record, rng) -> (text_input, text_output): records that carry their texts keep them; the others get one of
  their dataset's instruction templates, or with `instruction_format` "raw" / "dataset_name" (the paper's multitask
  baselines, config.data.instruction_format) their raw input (see data/templates.py); with `text_processing`
  "lavis" (config.text_processing) their captions and question cleaned first as LAVIS's (data/text.py)."""

  def render(record, rng):
    if "text_input" in record and "text_output" in record:
      return record["text_input"], record["text_output"]
    if text_processing == "lavis":
      record = text.for_training(record)
    return templates.render(record["dataset"], record, rng, instruction_format)
  return render
