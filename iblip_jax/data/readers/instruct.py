"""Instruction data used as it is: LLaVA-Instruct-150K, and a user's own JSONL."""
import os
from typing import Iterator

from iblip_jax.data import conversation
from iblip_jax.data.readers.files import (AnnotationError, BadLines, expect, field, iter_jsonl, join_path, load_json,
                                          make_record)

LLAVA_FILES = {
    "llava_instruct": "llava_instruct_150k.json",  # all three parts in one file
    "llava_conversation": "conversation_58k.json",
    "llava_complex_reasoning": "complex_reasoning_77k.json",
    "llava_detail": "detail_23k.json",
}


def read_llava_instruct(root: str, subset: str = "llava_instruct", image_dir: str | None = None,
                        turns: str = "first") -> Iterator[dict]:
  """LLaVA-Instruct-150K (huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K): {root}/{LLAVA_FILES[subset]}, a
  list of {"id", "image": "000000033471.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...]}. Images are COCO train2017: {image_dir}/{image}, image_dir defaulting to
  {root}/train2017. "text_input" is a human turn without the <image> tag, "text_output" the gpt reply.
  turns="first" keeps each conversation's first exchange, as LAVIS's llava150k_dataset.py does; turns="all" yields
  one record per exchange. The file's "id" is the COCO image id, and an image has several conversations (the
  combined file repeats ids), so record ids add the conversation's place in the file: "<id>_<i>", and with
  turns="all" "<id>_<i>_<k>" for exchange k. Uncertain (reference doc, section 8): how the paper split multi-turn
  conversations."""
  if subset not in LLAVA_FILES:
    raise ValueError(f"unknown LLaVA subset {subset!r}; known: {', '.join(LLAVA_FILES)}")
  if turns not in ("first", "all"):
    raise ValueError(f"turns={turns!r}; expected 'first' or 'all'")
  path = os.path.join(root, LLAVA_FILES[subset])
  image_dir = image_dir or os.path.join(root, "train2017")
  for i, item in enumerate(expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    id_ = field(item, "id", path, where)
    image = join_path(image_dir, field(item, "image", path, where, str))
    exchanges = conversation.llava_exchanges(field(item, "conversations", path, where, list), f"{path}: {where}")
    for k, (text_input, text_output) in enumerate(exchanges[:1] if turns == "first" else exchanges):
      yield make_record(subset, f"{id_}_{i}" if turns == "first" else f"{id_}_{i}_{k}", image=image,
                        text_input=text_input, text_output=text_output)


def read_jsonl(path: str, dataset: str = "jsonl") -> Iterator[dict]:
  """A user's own data: a JSONL file, one {"image": path, "text_input": ..., "text_output": ...} per line for
  training (optional "id", default the line number); a relative image path is relative to the JSONL file's
  directory. Evaluation files carry their task's fields instead of the texts (question, answers, candidates,
  answer_index, captions, label, ...): every other field is kept as it is."""
  base = os.path.dirname(os.path.abspath(path))
  bad = BadLines(path)   # every bad line is named at the end, not the first one per rerun
  for lineno, item in iter_jsonl(path, bad):
    where = f"line {lineno}"
    try:
      if "text_input" in item or "text_output" in item:  # a training line needs both texts
        for key in ("text_input", "text_output"):
          field(item, key, path, where, str)
      image = join_path(base, field(item, "image", path, where, str))
    except AnnotationError as e:
      bad.add(str(e))
      continue
    extra = {k: v for k, v in item.items() if k not in ("id", "image", "dataset")}
    yield make_record(dataset, item.get("id", lineno), image=image, **extra)
  bad.check()
