"""LAVIS's text cleaning (config.text_processing="lavis"), what its `blip_caption` / `blip_question` processors
(lavis/processors/blip_processors.py) do to captions and questions before any template or prompt sees them.

- pre_caption: lower-case; each of . ! " ( ) * # : ; ~ becomes a space; runs of whitespace become one space; at most
  `max_words` words. Question marks, commas, apostrophes and hyphens stay.
- pre_question: lower-case; the same characters are deleted (not spaced); trailing spaces go; at most `max_words`.

Where LAVIS applies them (its configs for the InstructBLIP evaluations and for BLIP-2's training on the same
datasets; InstructBLIP's own training code was not released): in training, captions (the caption datasets'
targets) through blip_caption, questions (VQA inputs, and question generation's targets) through blip_question;
answers, LLaVA-Instruct conversations and records that carry their own text are left as written. In evaluation the
question goes through blip_caption (the instructblip QA configs' `eval` text processor); reference captions and
answers are never touched (the metrics normalise them themselves).
"""
import re

MAX_WORDS = 50           # both processors' default; no InstructBLIP config changes it
_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def pre_caption(text: str, max_words: int = MAX_WORDS) -> str:
  text = _PUNCTUATION.sub(" ", text.lower())
  text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
  return " ".join(text.split(" ")[:max_words])


def pre_question(text: str, max_words: int = MAX_WORDS) -> str:
  text = _PUNCTUATION.sub("", text.lower()).rstrip(" ")
  return " ".join(text.split(" ")[:max_words])


def for_training(record: dict) -> dict:
  """A reader's record with its captions and question cleaned as LAVIS's training processors do."""
  out = dict(record)
  if isinstance(out.get("captions"), (list, tuple)):
    out["captions"] = [pre_caption(c) if isinstance(c, str) else c for c in out["captions"]]
  if isinstance(out.get("question"), str):
    out["question"] = pre_question(out["question"])
  return out


def for_evaluation(record: dict) -> dict:
  """An evaluation record with its question cleaned as LAVIS's evaluation processor (blip_caption) does."""
  if not isinstance(record.get("question"), str):
    return record
  return {**record, "question": pre_caption(record["question"])}
