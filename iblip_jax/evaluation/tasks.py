"""The evaluation tasks: prompt, inference mode, decoding settings and metric of each dataset.

Prompts and settings follow the paper's appendix (Table 8 and Appendix E) and LAVIS's evaluation configs.
Prompts are `str.format` templates over a record's fields. Decoding lengths are written as transformers'
`max_new_tokens` / `min_new_tokens`; LAVIS's `min_length=L` for T5 counts the decoder start token, so it is
`min_new_tokens=L-1` here.

`split` / `split_note`: the split a held-out task is scored on (the reader's `split` argument) and the evidence for
it (the paper, LAVIS's dataset builders, maintainers' answers on the LAVIS issue tracker); "unconfirmed" marks the
ones no code or maintainer states. Informational: the evaluator scores whatever records it is given.

Ranking settings, per task:
- `normalize`: score a candidate by its mean token log-likelihood instead of the sum. LAVIS sums (_predict_class,
  which favours short candidates, LAVIS #362); every paper task keeps the sum, for parity.
- `candidate_chunk`: rank at most this many candidates per model call and concatenate the scores (LAVIS's
  `n_segments`, written as a size so that memory is bounded whatever the list's length): MSVD-QA and MSRVTT-QA rank
  2,423 / 1,500 answers, whose logits would not fit at once. The scores are the same as unchunked.
- `class_words`: several answer words per class; a class scores the log of the summed likelihoods of its words
  (logsumexp). The team's notes recall the paper expanding binary labels into verbalizer sets (yes/true,
  no/false); neither the paper's text nor LAVIS's code (which has no Hateful Memes or VSR evaluation) could be
  checked, so Hateful Memes and VSR rank their single label words as their prompts ask, and the expanded sets are
  the variants `hateful_memes_verbalizers` / `vsr_verbalizers`.
"""
import dataclasses

import numpy as np

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
  normalize: bool = False          # ranking: mean instead of summed token log-likelihood
  candidate_chunk: int = 0         # ranking: candidates per model call (0 = all at once)
  class_words: tuple[tuple[str, ...], ...] = ()   # ranking: several words per class (scores combined by logsumexp)

  def __post_init__(self):
    if self.inference not in ("generate", "rank"):
      raise ValueError(f"task {self.name}: inference={self.inference!r}, expected 'generate' or 'rank'")
    if self.metric not in METRICS:
      raise ValueError(f"task {self.name}: metric={self.metric!r}, expected one of {sorted(METRICS)}")
    if self.candidate_chunk < 0:
      raise ValueError(f"task {self.name}: candidate_chunk={self.candidate_chunk}, expected >= 0")
    if self.class_words and (len(self.class_words) != len(self.candidates) or not all(self.class_words)):
      raise ValueError(f"task {self.name}: class_words needs one non-empty group per candidate class "
                       f"({len(self.candidates)}), got {self.class_words}")

  @property
  def headline(self) -> str:
    """The key of the metric the paper reports for this task, in evaluator.score's results."""
    return HEADLINE[self.metric]


METRICS = {"cider", "vqa", "exact_match", "ivqa", "accuracy", "auc", "mrr"}
HEADLINE = {"cider": "CIDEr", "vqa": "vqa", "exact_match": "exact_match", "ivqa": "ivqa", "accuracy": "accuracy",
            "auc": "AUC", "mrr": "MRR"}
# 2,423 / 1,500 candidates: 128 per call keeps a T5-XL batch of 8 under ~1 GB of candidate logits
VIDEO_QA_CHUNK = 128

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
    Task("msvd_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4, candidate_chunk=VIDEO_QA_CHUNK,
         split="test",
         split_note="test (LAVIS yaml valid_splits); candidates LAVIS's 2,423-answer list (ALPRO config, #333)"),
    Task("msrvtt_qa", QA_PROMPT, inference="rank", metric="accuracy", frames=4, candidate_chunk=VIDEO_QA_CHUNK,
         split="test",
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
    # --- variants of held-out tasks (not more datasets): the expanded verbalizer sets (see the module docstring) ---
    Task("hateful_memes_verbalizers", 'This is an image with: "{text}" written on it. Is it hateful? Answer:',
         inference="rank", metric="auc", candidates=("no", "yes"), class_words=(("no", "false"), ("yes", "true")),
         positive=1, held_out=False, split="dev_seen", split_note="as hateful_memes"),
    Task("vsr_verbalizers", 'Based on the image, is this statement true or false? "{caption}" Answer:',
         inference="rank", metric="accuracy", candidates=("false", "true"),
         class_words=(("false", "no"), ("true", "yes")), held_out=False, split="test", split_note="as vsr"),
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


def class_scores(task: Task, word_scores) -> list[float]:
  """Per-class scores from the scores of `rank_candidates(task, record)`: each class's words combined by logsumexp
  (the log of their summed likelihoods); the scores themselves when the task has no class_words."""
  scores = [float(x) for x in word_scores]
  if not task.class_words:
    return scores
  out, i = [], 0
  for group in task.class_words:
    out.append(float(np.logaddexp.reduce(scores[i:i + len(group)])))
    i += len(group)
  return out


def rank_candidates(task: Task, record: dict) -> list[str]:
  """What a ranking task scores for `record`: its class words (flattened, class by class), the task's fixed
  candidates, or the record's own."""
  if task.class_words:
    return [w for group in task.class_words for w in group]
  cands = task.candidates or record.get("candidates")
  if not cands:
    raise ValueError(f"task {task.name}: record {record.get('id')!r} has no 'candidates' to rank")
  return list(cands)


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(sorted(TASKS))}")
  return TASKS[name]
