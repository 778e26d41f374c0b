"""The evaluation tasks: prompt, inference mode, decoding settings and metric of each dataset.

Prompts and settings follow the paper's appendix and LAVIS (../shared/reference/lavis_instructblip.md, section 4).
Prompts are `str.format` templates over a record's fields. Decoding lengths are written as transformers'
`max_new_tokens` / `min_new_tokens`; LAVIS's `min_length=L` for T5 counts the decoder start token, so it is
`min_new_tokens=L-1` here.
"""
import dataclasses

CAPTION_PROMPT = "A short image description:"
QA_PROMPT = "Question: {question} Short answer:"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  prompt: str
  inference: str                   # "generate" or "rank"
  metric: str                      # cider | vqa | exact_match | ivqa | accuracy | auc | mrr
  held_out: bool = True
  num_beams: int = 5
  max_new_tokens: int = 10
  min_new_tokens: int = 0
  length_penalty: float = -1.0
  repetition_penalty: float = 1.5  # LAVIS generate()'s default
  frames: int = 0                  # 0 = an image; n = a video, n frames sampled uniformly
  candidates: tuple[str, ...] = ()  # fixed candidate set; else each record's "candidates"
  positive: int = 1                # for auc: index of the positive candidate

  def __post_init__(self):
    if self.inference not in ("generate", "rank"):
      raise ValueError(f"task {self.name}: inference={self.inference!r}, expected 'generate' or 'rank'")
    if self.metric not in METRICS:
      raise ValueError(f"task {self.name}: metric={self.metric!r}, expected one of {sorted(METRICS)}")


METRICS = {"cider", "vqa", "exact_match", "ivqa", "accuracy", "auc", "mrr"}

_caption = dict(inference="generate", metric="cider", max_new_tokens=80, min_new_tokens=9, length_penalty=1.0,
                repetition_penalty=1.0)
_qa = dict(inference="generate", max_new_tokens=10, length_penalty=-1.0)

TASKS = {t.name: t for t in [
    # --- the 13 held-out datasets (zero-shot) ---
    Task("nocaps", CAPTION_PROMPT, **_caption),
    Task("flickr30k", CAPTION_PROMPT, **_caption),
    Task("gqa", QA_PROMPT, metric="exact_match", **_qa),
    Task("vizwiz", QA_PROMPT, metric="vqa", **_qa),
    Task("textvqa", "OCR tokens: {ocr_tokens}. Question: {question} Short answer:", metric="vqa", **_qa),
    Task("ivqa", QA_PROMPT, metric="ivqa", frames=4, **_qa),
    Task("msvd_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4),
    Task("msrvtt_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4),
    Task("iconqa", "Question: {question} Options: {options}. Short answer:", inference="rank", metric="accuracy"),
    Task("scienceqa_img", "Context: {context} Question: {question} Options: {options}. Answer:", inference="rank",
         metric="accuracy"),
    Task("hateful_memes", 'This is an image with: "{text}" written on it. Is it hateful? Answer:',
         inference="rank", metric="auc", candidates=("no", "yes"), positive=1),
    Task("vsr", 'Based on the image, is this statement true or false? "{caption}" Answer:', inference="rank",
         metric="accuracy", candidates=("false", "true")),
    Task("visdial", "Dialog history: {history}\n Question: {question} Short answer:", inference="rank",
         metric="mrr"),
    # --- held-in validation splits ---
    Task("coco_caption", "A short image caption:", held_out=False, **_caption),
    Task("textcaps", "A short image caption:", held_out=False, **_caption),
    Task("vqav2", QA_PROMPT, metric="vqa", held_out=False, **_qa),
    Task("okvqa", QA_PROMPT, metric="vqa", held_out=False, **_qa),
    Task("aokvqa", QA_PROMPT, metric="vqa", held_out=False, **_qa),
    Task("aokvqa_mc", "Question: {question} Options: {options}. Short answer:", inference="rank",
         metric="accuracy", held_out=False),
    Task("ocrvqa", QA_PROMPT, metric="exact_match", held_out=False, **_qa),
    # --- generic tasks for users' own data (and the demo) ---
    Task("vqa", QA_PROMPT, metric="vqa", held_out=False, **_qa),
    Task("multiple_choice", "Question: {question} Options: {options}. Short answer:", inference="rank",
         metric="accuracy", held_out=False),
    Task("caption", CAPTION_PROMPT, held_out=False, **_caption),
    # the question alone, answers ranked among candidates (as for MSVD-QA / MSRVTT-QA)
    Task("qa_ranking", QA_PROMPT, inference="rank", metric="accuracy", held_out=False),
]}


def options_text(choices) -> str:
  """LAVIS's rendering of choices inside a prompt: "(a) c1 (b) c2 ..."."""
  return " ".join(f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(choices))


def render_prompt(task: Task, record: dict) -> str:
  fields = dict(record)
  if "options" not in fields and "candidates" in fields:
    fields["options"] = options_text(fields["candidates"])
  for key in ("ocr_tokens", "history"):
    if isinstance(fields.get(key), (list, tuple)):
      fields[key] = ", ".join(fields[key]) if key == "ocr_tokens" else " ".join(fields[key])
  try:
    return task.prompt.format(**fields)
  except KeyError as e:
    raise ValueError(f"task {task.name}: record {record.get('id', '?')!r} has no field {e} needed by its prompt "
                     f"{task.prompt!r}") from None


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(sorted(TASKS))}")
  return TASKS[name]
