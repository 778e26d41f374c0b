"""Readers for the InstructBLIP datasets, each in the annotation format its authors released.

Every reader takes the local directory the user points to (`root`), never downloads anything, and lazily yields
plain dict records:
  "id" (unique within the dataset), "dataset", "image" (absolute path) or "frames" (sorted frame paths, video), and
  task fields: "captions"; "question", "answers" (all annotators', duplicates kept), "answer" (one canonical
  answer); "candidates" + "answer_index"; "text" + "label" (HatefulMemes); "caption" + "label" (VSR); "context"
  (ScienceQA); "ocr_tokens" (scene-text datasets, when the source has them); "history" (Visual Dialog);
  "text_input" + "text_output" (LLaVA, user JSONL). Fields a dataset lacks are omitted (e.g. answers of test
  splits).
Images are not opened: a record whose image is missing is still yielded (the input pipeline skips and counts it).
A malformed annotation file (bad JSON, bytes that are not UTF-8, a missing key, a wrong type) raises ValueError naming
the file and the line or record. Stopping is deliberate, unlike the input pipeline's skip-and-count for bad examples:
readers run before training starts, so nothing is lost, and a broken annotation file is better fixed than silently
thinned. Each reader's docstring names the files it expects and the public layout it follows.

Video datasets: the project decodes no video, so MSVD-QA, MSRVTT-QA and iVQA expect frames extracted beforehand,
one directory of image files per video under `frames_dir` (named as documented per reader); "frames" lists them in
natural order (frame_2 before frame_10) and is empty when the directory is missing. The evaluator samples 4 of them
uniformly (paper: 4 frames).

Modules: files (shared helpers), captions, vqa, choices, video, instruct. READERS maps dataset names (those of
templates.DATASET_TASKS and evaluation.tasks.TASKS) to readers.
"""
import functools
from typing import Iterator

from iblip_jax.data.readers.captions import (read_coco_caption, read_flickr30k, read_nocaps, read_textcaps,
                                             read_web_capfilt)
from iblip_jax.data.readers.choices import read_hateful_memes, read_iconqa, read_scienceqa, read_visdial, read_vsr
from iblip_jax.data.readers.files import FRAME_EXTENSIONS, iter_jsonl, list_frames, load_json
from iblip_jax.data.readers.instruct import LLAVA_FILES, read_jsonl, read_llava_instruct
from iblip_jax.data.readers.video import MSRVTT_TOP_K, MSVD_TOP_K, read_ivqa, read_msrvtt_qa, read_msvd_qa
from iblip_jax.data.readers.vqa import (read_aokvqa, read_gqa, read_ocrvqa, read_okvqa, read_textvqa, read_vizwiz,
                                        read_vqav2)


READERS = {
    # held-in
    "coco_caption": read_coco_caption,
    "web_capfilt": read_web_capfilt,
    "textcaps": read_textcaps,
    "vqav2": read_vqav2,
    "vqg": functools.partial(read_vqav2, dataset="vqg"),
    "okvqa": read_okvqa,
    "okvqa_qg": functools.partial(read_okvqa, dataset="okvqa_qg"),
    "aokvqa": read_aokvqa,
    "aokvqa_qg": functools.partial(read_aokvqa, dataset="aokvqa_qg"),
    "aokvqa_mc": functools.partial(read_aokvqa, dataset="aokvqa_mc"),  # multiple choice (paper Table 3)
    "ocrvqa": read_ocrvqa,
    **{name: functools.partial(read_llava_instruct, subset=name) for name in LLAVA_FILES},
    # held-out
    "nocaps": read_nocaps,
    "flickr30k": read_flickr30k,
    "gqa": read_gqa,
    "vsr": read_vsr,
    "iconqa": read_iconqa,
    "textvqa": read_textvqa,
    "visdial": read_visdial,
    "hateful_memes": read_hateful_memes,
    "vizwiz": read_vizwiz,
    "scienceqa_img": read_scienceqa,
    "msvd_qa": read_msvd_qa,
    "msrvtt_qa": read_msrvtt_qa,
    "ivqa": read_ivqa,
    # user data (the argument is the JSONL file)
    "jsonl": read_jsonl,
}


def read(dataset: str, root: str, **kwargs) -> Iterator[dict]:
  if dataset not in READERS:
    raise ValueError(f"no reader for dataset {dataset!r}; known: {', '.join(sorted(READERS))}")
  return READERS[dataset](root, **kwargs)


__all__ = ["FRAME_EXTENSIONS", "LLAVA_FILES", "MSRVTT_TOP_K", "MSVD_TOP_K", "READERS", "iter_jsonl", "list_frames",
           "load_json", "read"] + [name for name in dir() if name.startswith("read_")]
