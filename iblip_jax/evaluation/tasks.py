"""The evaluation tasks: prompt, inference mode, decoding settings and metric of each dataset.

Prompts and settings follow the paper's appendix (Table 8 and Appendix E) and LAVIS's evaluation configs.
Prompts are `str.format` templates over a record's fields. Decoding lengths are written as transformers'
`max_new_tokens` / `min_new_tokens`; LAVIS's `min_length=L` for T5 counts the decoder start token, so it is
`min_new_tokens=L-1` here.

`split` / `split_note`: the split a held-out task is scored on (the reader's `split` argument) and the evidence for
it (the paper, LAVIS's dataset builders, maintainers' answers on the LAVIS issue tracker); "unconfirmed" marks the
ones no code or maintainer states. Informational: the evaluator scores whatever records it is given.
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
  split: str = ""                  # the split scored (reader's `split`); "" = not fixed here
  split_note: str = ""             # where that split comes from, or what is unconfirmed about it

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
    Task("nocaps", CAPTION_PROMPT, **_caption, split="val",
         split_note="val, 4,500 images (nocaps_val_4500_captions.json); LAVIS's [X-IB] config scores an out-domain "
                    "subset: whether the paper's number is all of val or out-domain is unconfirmed"),
    Task("flickr30k", CAPTION_PROMPT, **_caption, split="test", split_note="Karpathy 1K test (LAVIS #719)"),
    Task("gqa", QA_PROMPT, metric="exact_match", **_qa, split="testdev",
         split_note="testdev balanced, 12,578 questions (LAVIS gqa/balanced_testdev.yaml)"),
    Task("vizwiz", QA_PROMPT, metric="vqa", **_qa, split="val",
         split_note="unconfirmed: the paper's split is not in code; test-dev answers are private (EvalAI), val is "
                    "local (LAVIS #352)"),
    Task("textvqa", "OCR tokens: {ocr_tokens}. Question: {question} Short answer:", metric="vqa", **_qa,
         split="val", split_note="val, 5,000 questions (common practice; not in LAVIS configs)"),
    Task("ivqa", QA_PROMPT, metric="ivqa", frames=4, **_qa, split="test", split_note="test.csv (just-ask)"),
    Task("msvd_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4, split="test",
         split_note="test (LAVIS yaml valid_splits); candidates LAVIS's 2,423-answer list (ALPRO config, #333)"),
    Task("msrvtt_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4, split="test",
         split_note="test (LAVIS yaml valid_splits); candidates LAVIS's 1,500-answer list (ALPRO)"),
    Task("iconqa", "Question: {question} Options: {options}. Short answer:", inference="rank", metric="accuracy",
         split="test", split_note="test, choose_txt (LAVIS download_iconqa.py)"),
    Task("scienceqa_img", "Context: {context} Question: {question} Options: {options}. Answer:", inference="rank",
         metric="accuracy", split="test", split_note="test, IMG subset (LAVIS #326, #390)"),
    Task("hateful_memes", 'This is an image with: "{text}" written on it. Is it hateful? Answer:',
         inference="rank", metric="auc", candidates=("no", "yes"), positive=1, split="dev_seen",
         split_note="unconfirmed: MMF defaults to dev_unseen / test_unseen; paper v1 reported test_seen (mmf #967)"),
    Task("vsr", 'Based on the image, is this statement true or false? "{caption}" Answer:', inference="rank",
         metric="accuracy", candidates=("false", "true"), split="test",
         split_note="unconfirmed variant: zeroshot test is 1,222 at the VSR repo's HEAD (731 before the 2023-03-22 "
                    "split rewrite, af55c2c); record the commit of the split file used"),
    Task("visdial", "Dialog history: {history}\n Question: {question} Short answer:", inference="rank",
         metric="mrr", split="val", split_note="v1.0 val, 100 options, MRR"),
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
