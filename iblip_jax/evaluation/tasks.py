"""The evaluation tasks: prompt, inference mode, decoding settings and metric of each dataset.

Prompts come from the prompt catalogue (iblip_jax/prompts.py), decoding settings are iblip_jax.decoding.Decoding's;
both follow the paper's appendix (Table 8 and Appendix E) and LAVIS's evaluation configs. Decoding lengths are
written as transformers' `max_new_tokens` / `min_new_tokens`; LAVIS's `min_length=L` for T5 counts the decoder
start token, so it is `min_new_tokens=L-1` here, and L for Vicuna (Task.decoding_for).

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

from iblip_jax import prompts
from iblip_jax.decoding import Decoding

# Generation settings by task type, as LAVIS evaluates FlanT5 (lavis/tasks/vqa.py and captioning.py with
# blip2_t5_instruct.py): short answers: VQATask's max_len 10, min_len 1 and predict_answers' length_penalty -1 and
# generate's repetition_penalty 1.5; captions: the InstructBLIP caption configs' max_len 80, min_len 10, beams 5,
# length_penalty 1.0 and CaptionTask's repetition_penalty default 1.15 (no InstructBLIP config overrides it).
QA_DECODING = Decoding(num_beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0)
CAPTION_DECODING = Decoding(num_beams=5, max_new_tokens=80, min_new_tokens=9, length_penalty=1.0,
                            repetition_penalty=1.15)
# Vicuna (blip2_vicuna_instruct.py) is given the same min_len, but a decoder-only generate from inputs_embeds has no
# start token to count: min_len L is L new tokens (one more than T5's). Its predict_answers' length_penalty default
# is 0, not -1; captions pass theirs explicitly.
VICUNA_DECODING = {QA_DECODING: dataclasses.replace(QA_DECODING, min_new_tokens=1, length_penalty=0.0),
                   CAPTION_DECODING: dataclasses.replace(CAPTION_DECODING, min_new_tokens=10)}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  prompt: str
  inference: str                   # "generate" or "rank"
  metric: str                      # cider | vqa | exact_match | ivqa | accuracy | auc | mrr
  held_out: bool = True
  decoding: Decoding = QA_DECODING  # generation tasks' settings
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

  def decoding_for(self, decoder_only: bool) -> Decoding:
    """The generation settings for the LLM's kind: as written for FlanT5, LAVIS's Vicuna equivalents for a
    decoder-only LLM (VICUNA_DECODING; a task's own settings get the one extra minimum token)."""
    if not decoder_only:
      return self.decoding
    return VICUNA_DECODING.get(self.decoding) or dataclasses.replace(
        self.decoding, min_new_tokens=self.decoding.min_new_tokens + 1)

  @property
  def selection(self) -> tuple[str, ...]:
    """The metrics LAVIS's `agg_metrics` adds up for checkpoint selection: CIDEr + BLEU-4 for captions
    (lavis/tasks/captioning.py), the headline metric otherwise (vqa.py: accuracy)."""
    return ("CIDEr", "BLEU-4") if self.metric == "cider" else (self.headline,)

  @property
  def headline(self) -> str:
    """The key of the metric the paper reports for this task, in evaluator.score's results."""
    return HEADLINE[self.metric]


METRICS = {"cider", "vqa", "exact_match", "ivqa", "accuracy", "auc", "mrr"}
HEADLINE = {"cider": "CIDEr", "vqa": "vqa", "exact_match": "exact_match", "ivqa": "ivqa", "accuracy": "accuracy",
            "auc": "AUC", "mrr": "MRR"}
# 2,423 / 1,500 candidates: 128 per call keeps a T5-XL batch of 8 under ~1 GB of candidate logits
VIDEO_QA_CHUNK = 128

_caption = dict(inference="generate", metric="cider", decoding=CAPTION_DECODING)
_qa = dict(inference="generate")
Z = prompts.ZERO_SHOT

TASKS = {t.name: t for t in [
    # --- the 13 held-out datasets (zero-shot) ---
    Task("nocaps", Z["nocaps"], **_caption, split="val",
         split_note="val, 4,500 images (nocaps_val_4500_captions.json); LAVIS's [X-IB] config scores an out-domain "
                    "subset: whether the paper's number is all of val or out-domain is unconfirmed"),
    Task("flickr30k", Z["flickr30k"], **_caption, split="test", split_note="Karpathy 1K test (LAVIS #719)"),
    Task("gqa", Z["gqa"], metric="exact_match", **_qa, split="testdev",
         split_note="testdev balanced, 12,578 questions (LAVIS gqa/balanced_testdev.yaml)"),
    Task("vizwiz", Z["vizwiz"], metric="vqa", **_qa, split="val",
         split_note="unconfirmed: the paper's split is not in code; test-dev answers are private (EvalAI), val is "
                    "local (LAVIS #352)"),
    Task("textvqa", Z["textvqa"], metric="vqa", **_qa, split="val",
         split_note="val, 5,000 questions (common practice; not in LAVIS configs)"),
    Task("ivqa", Z["ivqa"], metric="ivqa", frames=4, **_qa, split="test", split_note="test.csv (just-ask)"),
    Task("msvd_qa", Z["msvd_qa"], inference="rank", metric="accuracy", frames=4, candidate_chunk=VIDEO_QA_CHUNK,
         split="test",
         split_note="test (LAVIS yaml valid_splits); candidates LAVIS's 2,423-answer list (ALPRO config, #333)"),
    Task("msrvtt_qa", Z["msrvtt_qa"], inference="rank", metric="accuracy", frames=4, candidate_chunk=VIDEO_QA_CHUNK,
         split="test",
         split_note="test (LAVIS yaml valid_splits); candidates LAVIS's 1,500-answer list (ALPRO)"),
    Task("iconqa", Z["iconqa"], inference="rank", metric="accuracy", split="test",
         split_note="test, choose_txt (LAVIS download_iconqa.py)"),
    Task("scienceqa_img", Z["scienceqa_img"], inference="rank", metric="accuracy", split="test",
         split_note="test, IMG subset (LAVIS #326, #390)"),
    Task("hateful_memes", Z["hateful_memes"], inference="rank", metric="auc",
         candidates=prompts.LABEL_WORDS["hateful_memes"], positive=1, split="dev_seen",
         split_note="unconfirmed: MMF defaults to dev_unseen / test_unseen; paper v1 reported test_seen (mmf #967)"),
    Task("vsr", Z["vsr"], inference="rank", metric="accuracy", candidates=prompts.LABEL_WORDS["vsr"], split="test",
         split_note="unconfirmed variant: zeroshot test is 1,222 at the VSR repo's HEAD (731 before the 2023-03-22 "
                    "split rewrite, af55c2c); record the commit of the split file used"),
    Task("visdial", Z["visdial"], inference="rank", metric="mrr", split="val", split_note="v1.0 val, 100 options, MRR"),
    # --- variants of held-out tasks (not more datasets): the expanded verbalizer sets (see the module docstring) ---
    Task("hateful_memes_verbalizers", Z["hateful_memes"], inference="rank", metric="auc",
         candidates=prompts.LABEL_WORDS["hateful_memes"], class_words=(("no", "false"), ("yes", "true")),
         positive=1, held_out=False, split="dev_seen", split_note="as hateful_memes"),
    Task("vsr_verbalizers", Z["vsr"], inference="rank", metric="accuracy", candidates=prompts.LABEL_WORDS["vsr"],
         class_words=(("false", "no"), ("true", "yes")), held_out=False, split="test", split_note="as vsr"),
    # --- held-in validation splits ---
    Task("coco_caption", prompts.CAPTION_HELD_IN, held_out=False, **_caption),
    Task("textcaps", prompts.CAPTION_HELD_IN, held_out=False, **_caption),
    Task("vqav2", prompts.QA, metric="vqa", held_out=False, **_qa),
    Task("okvqa", prompts.QA, metric="vqa", held_out=False, **_qa),
    Task("aokvqa", prompts.QA, metric="vqa", held_out=False, **_qa),
    Task("aokvqa_mc", prompts.OPTIONS_QA, inference="rank", metric="accuracy", held_out=False),
    Task("ocrvqa", prompts.QA, metric="exact_match", held_out=False, **_qa),
    # --- generic tasks for users' own data (and the demo) ---
    Task("vqa", prompts.QA, metric="vqa", held_out=False, **_qa),
    Task("multiple_choice", prompts.OPTIONS_QA, inference="rank", metric="accuracy", held_out=False),
    Task("caption", prompts.CAPTION, held_out=False, **_caption),
    # the question alone, answers ranked among candidates (as for MSVD-QA / MSRVTT-QA)
    Task("qa_ranking", prompts.QA, inference="rank", metric="accuracy", held_out=False),
]}


def render_prompt(task: Task, record: dict) -> str:
  """The task's prompt filled from `record` (prompts.render); ValueError naming the task, record and field."""
  return prompts.render(task.prompt, record, f"task {task.name}")


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
