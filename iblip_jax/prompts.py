"""The prompt catalogue: the zero-shot prompts of the held-out datasets and the generic tasks, and how a prompt and
its multiple-choice options are filled from a record.

Below both the training templates (data/templates.py: the "prompt" datasets train on their zero-shot prompt) and
the evaluation task table (evaluation/tasks.py), which take their texts from here. Wording from the paper's
appendix (Table 8, Appendix E) and LAVIS's evaluation configs. A prompt is a `str.format` template over a record's
fields.
"""
from typing import Sequence

CAPTION = "A short image description:"
CAPTION_HELD_IN = "A short image caption:"          # COCO Caption and TextCaps validation (LAVIS's configs)
QA = "Question: {question} Short answer:"
OCR_QA = "OCR tokens: {ocr_tokens}. Question: {question} Short answer:"
OPTIONS_QA = "Question: {question} Options: {options}. Short answer:"
SCIENCEQA = "Context: {context} Question: {question} Options: {options}. Answer:"
HATEFUL_MEMES = 'This is an image with: "{text}" written on it. Is it hateful? Answer:'
VSR = 'Based on the image, is this statement true or false? "{caption}" Answer:'
VISDIAL = "Dialog history: {history}\n Question: {question} Short answer:"

# The held-out datasets' zero-shot prompts (Table 1's 13).
ZERO_SHOT = {
    "nocaps": CAPTION, "flickr30k": CAPTION, "gqa": QA, "vizwiz": QA, "textvqa": OCR_QA, "ivqa": QA, "msvd_qa": QA,
    "msrvtt_qa": QA, "iconqa": OPTIONS_QA, "scienceqa_img": SCIENCEQA, "hateful_memes": HATEFUL_MEMES, "vsr": VSR,
    "visdial": VISDIAL}
# The answer words of the binary classification prompts, by label (0, 1): what ranking scores.
LABEL_WORDS = {"hateful_memes": ("no", "yes"), "vsr": ("false", "true")}


def options_text(choices: Sequence[str]) -> str:
  """LAVIS's rendering of choices inside a prompt: "(a) c1 (b) c2 ..."."""
  return " ".join(f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(choices))


def render(prompt: str, record: dict, where: str) -> str:
  """`prompt` filled from `record`: "options" from its "candidates" when it has none, OCR tokens joined by ", ",
  a dialog history by spaces. ValueError naming `where`, the record and the missing field."""
  fields = dict(record)
  if "options" not in fields and "candidates" in fields:
    fields["options"] = options_text(fields["candidates"])
  for key in ("ocr_tokens", "history"):
    if isinstance(fields.get(key), (list, tuple)):
      fields[key] = ", ".join(fields[key]) if key == "ocr_tokens" else " ".join(fields[key])
  try:
    return prompt.format(**fields)
  except KeyError as e:
    raise ValueError(f"{where}: record {record.get('id', '?')!r} has no field {e} needed by its prompt "
                     f"{prompt!r}") from None
