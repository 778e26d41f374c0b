"""Instruction templates of the paper (InstructBLIP Table 7) as data, and rendering a record into (input, target).

The wording is verbatim from the paper's appendix (Table 7), cross-checked against public reimplementations;
tests/data/test_templates.py compares these lists with a snapshot of the team's reference notes. The paper
writes every template after a leading `<Image>`; here the visual tokens are not part of the text (the model
prepends the query outputs), so the templates start at the instruction.

The zero-shot evaluation prompts are not here: they live in the prompt catalogue (iblip_jax/prompts.py).

Rendering (`render`) follows LAVIS / X-InstructBLIP's instruction datasets: a template drawn at random per sample;
captioning targets are one of the image's captions, VQA targets one of the annotators' answers (duplicates kept, so
the draw is frequency-weighted), question generation inverts VQA (the answer goes into the template, the question is
the target), LLaVA-Instruct-150K is used as is. All randomness comes from the `rng` argument, in a fixed order
(template first, then target), so the same seed gives the same text. Texts are returned as given: LAVIS's
lower-casing and punctuation cleaning (config.text_processing="lavis", data/text.py) runs on the record before.

Every reader's records render, so that any dataset can be fine-tuned on (the paper's Table 3 fine-tunes on
ScienceQA-IMG and A-OKVQA multiple choice). For the held-out datasets the paper gives no training templates; the
choices, by task type:
- captioning (NoCaps, Flickr30K) and open-ended QA (GQA, VizWiz, TextVQA, the video QA sets) use the caption / VQA
  templates, as their held-in counterparts do;
- multiple choice ("mc": ScienceQA-IMG, IconQA choose_txt, A-OKVQA as "aokvqa_mc") is VQA with the options listed
  after the question, "{question} Options: (a) x (b) y" (LAVIS's option rendering, prompts.options_text,
  worded as the zero-shot IconQA / ScienceQA prompts), inside the VQA templates, which the paper uses for A-OKVQA;
  the target is the correct option's text (what ranking scores). ScienceQA's hint goes first as "Context: {hint} "
  (the zero-shot prompt's wording) when there is one. An IconQA fill_in_blank record (no options) is plain VQA;
- yes/no-like classification and dialogue (VSR, Hateful Memes, Visual Dialog) have no template family in the paper:
  the instruction is the dataset's zero-shot prompt (prompts.ZERO_SHOT), so fine-tuning and evaluation agree,
  and the target is the candidate that ranking scores as right ("true"/"false", "yes"/"no", the ground-truth
  answer among the dialog round's options);
- video QA records train on one frame, the middle one (pipeline.load_example): LAVIS's training forward() has no
  video branch, and the 4-frame input exists only at evaluation.

Instruction formats (`render(..., instruction_format=)`, config.data.instruction_format): the paper's comparison of
instruction tuning with multitask training (its Fig. 4 / v1 Table 4) trains the same data three ways:
- "templates" (default): instruction tuning, as above;
- "raw": multitask training without instructions: the record's own input alone, i.e. what fills a template's slot:
  the question (VQA; with its options and context for multiple choice), the answer (question generation), the
  statement / meme text / dialog question (VSR, Hateful Memes, Visual Dialog) and an empty instruction for
  captions. OCR tokens stay (they are input data, not instruction);
- "dataset_name": the raw input behind a "[Task:Dataset]" identifier, e.g. "[Visual question answering:VQAv2] what
  color is it?"; the identifier's wording follows the paper's description as we recall it (unconfirmed; the paper
  gives one example and no list).
LLaVA-Instruct-150K and records that carry their own texts are used as they are in every format. Evaluation always
uses the tasks' prompts (the paper applies instructions to both models for held-out evaluation).
"""
from typing import Sequence

import numpy as np

from iblip_jax import prompts

# Image captioning (13). "Short"/"briefly" are already part of the paper's wording.
CAPTION_TEMPLATES = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

# Visual question answering (10); also used for OKVQA, A-OKVQA (direct answers) and OCR-VQA.
VQA_TEMPLATES = (
    "{Question}",
    "Question: {Question}",
    "{Question} A short answer to the question is",
    "Q: {Question} A:",
    "Question: {Question} Short answer:",
    "Given the image, answer the following question with no more than three words. {Question}",
    "Based on the image, respond to this question with a short answer: {Question}. Answer:",
    "Use the provided image to answer the question: {Question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{Question}"',
    'The question "{Question}" can be answered using the image. A short answer is',
)

# Visual question generation (6): the answer is given, the question is the target. The paper's text says "10 to 15
# templates per task", but its appendix (Table 7, as the team's notes transcribe it and public reimplementations
# corroborate) prints six for question generation: we keep the six it prints rather than invent more.
# Uncertain (reference doc, 3.6): the exact " Question:" suffixes; MiniGPT-v2 reuses this list without them. Kept as
# the document writes them, including the paper's "generate an question".
VQG_TEMPLATES = (
    "Given the image, generate a question whose answer is: {Answer}. Question:",
    "Based on the image, provide a question with the answer: {Answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{Answer}".',
    "From the image provided, craft a question that leads to the reply: {Answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {Answer}.",
    "Taking the image into account, generate an question that has the answer: {Answer}. Question:",
)

# "mc" (multiple choice) draws from the VQA templates with the options appended to the question; "prompt" datasets
# use their zero-shot prompt (see the module docstring).
TASK_TEMPLATES = {"caption": CAPTION_TEMPLATES, "vqa": VQA_TEMPLATES, "vqg": VQG_TEMPLATES, "mc": VQA_TEMPLATES}
MC_QUESTION = "{question} Options: {options}"
CONTEXT_PREFIX = "Context: {} "

# The 13 held-in datasets (reference doc 3.5 / paper Fig. 2) and the task whose templates each uses; None = used as
# is (no template). Question generation counts as three datasets (from VQAv2, OKVQA, A-OKVQA) and
# LLaVA-Instruct-150K as three (its visual conversation, complex reasoning and detailed description parts).
HELD_IN_TASKS = {
    "coco_caption": "caption",
    "web_capfilt": "caption",
    "textcaps": "caption",
    "vqav2": "vqa",
    "vqg": "vqg",               # question generation from VQAv2
    "okvqa_qg": "vqg",
    "aokvqa_qg": "vqg",
    "okvqa": "vqa",
    "aokvqa": "vqa",
    "ocrvqa": "vqa",
    "llava_conversation": None,
    "llava_complex_reasoning": None,
    "llava_detail": None,
}
HELD_IN = tuple(HELD_IN_TASKS)

# The other datasets, for fine-tuning (paper Table 3) or a user's own mixture; the module docstring gives the choices.
DOWNSTREAM_TASKS = {
    "aokvqa_mc": "mc",
    "nocaps": "caption",
    "flickr30k": "caption",
    "gqa": "vqa",
    "vizwiz": "vqa",
    "textvqa": "vqa",           # with its OCR tokens
    "ivqa": "vqa",
    "msvd_qa": "vqa",
    "msrvtt_qa": "vqa",
    "iconqa": "mc",             # fill_in_blank records (no options): plain VQA
    "scienceqa_img": "mc",      # with its hint as context
    "vsr": "prompt",
    "hateful_memes": "prompt",
    "visdial": "prompt",
}

# Everything `render` accepts: the held-in datasets, LLaVA-Instruct-150K read as one file (all three parts), a user's
# own JSONL data (records carry text_input/text_output already), and the downstream datasets.
DATASET_TASKS = {**HELD_IN_TASKS, "llava_instruct": None, "jsonl": None, **DOWNSTREAM_TASKS}

# Scene-text datasets: their OCR tokens (when a record has "ocr_tokens") go into the instruction.
OCR_DATASETS = frozenset({"textcaps", "ocrvqa", "textvqa"})
# LAVIS fills a prompt's OCR slot with ", ".join(ocr_tokens[:30]) (generate() L307-309, predict_answers()
# L431-436). Uncertain (reference doc, section 8): how OCR tokens were written into the *training* instructions and
# whether OCR-VQA had any (its released annotations carry none). We prefix the instruction with the wording of the
# TextVQA zero-shot prompt ("OCR tokens: {}. Question: ..." in prompts.py), so training and evaluation
# present OCR the same way.
MAX_OCR_TOKENS = 30
OCR_PREFIX = "OCR tokens: {}. "


INSTRUCTION_FORMATS = ("templates", "raw", "dataset_name")
# The identifiers of the "dataset_name" format: task and dataset names as the paper's figures write them.
TASK_NAMES = {"caption": "Image captioning", "vqa": "Visual question answering", "vqg": "Visual question generation",
              "mc": "Multiple-choice visual question answering", "prompt": None}
DATASET_NAMES = {
    "coco_caption": "COCO Caption", "web_capfilt": "Web CapFilt", "textcaps": "TextCaps", "vqav2": "VQAv2",
    "vqg": "VQAv2", "okvqa": "OKVQA", "okvqa_qg": "OKVQA", "aokvqa": "A-OKVQA", "aokvqa_qg": "A-OKVQA",
    "aokvqa_mc": "A-OKVQA", "ocrvqa": "OCR-VQA", "nocaps": "NoCaps", "flickr30k": "Flickr30K", "gqa": "GQA",
    "vizwiz": "VizWiz", "textvqa": "TextVQA", "ivqa": "iVQA", "msvd_qa": "MSVD-QA", "msrvtt_qa": "MSRVTT-QA",
    "iconqa": "IconQA", "scienceqa_img": "ScienceQA", "vsr": "VSR", "hateful_memes": "HatefulMemes",
    "visdial": "Visual Dialog"}
# "prompt" datasets: the record field that is their raw input, and their task's name for the identifier.
PROMPT_RAW = {"vsr": ("caption", "Visual spatial reasoning"), "hateful_memes": ("text", "Image classification"),
              "visdial": ("question", "Visual conversational question answering")}


def templates_for(dataset: str) -> tuple[str, ...]:
  """The templates `dataset` draws from; () for datasets used as is; its zero-shot prompt for "prompt" datasets."""
  task = _task(dataset)
  if task == "prompt":
    return (prompts.ZERO_SHOT[dataset],)
  return TASK_TEMPLATES[task] if task else ()


def inject_ocr(instruction: str, ocr_tokens: Sequence[str], max_tokens: int = MAX_OCR_TOKENS) -> str:
  """Prefix the instruction with the first `max_tokens` OCR tokens; unchanged when there are none."""
  tokens = [str(t) for t in ocr_tokens[:max_tokens]]
  return OCR_PREFIX.format(", ".join(tokens)) + instruction if tokens else instruction


def render(dataset: str, record: dict, rng: np.random.Generator,
           instruction_format: str = "templates") -> tuple[str, str]:
  """(text_input, text_output) for one training sample of `dataset`; draws come from `rng`, template first.
  `instruction_format`: "templates" (instruction tuning), "raw" or "dataset_name" (see the module docstring)."""
  if instruction_format != "templates":
    return _render_untemplated(dataset, record, rng, instruction_format)
  task = _task(dataset)
  if task is None:
    return _field(dataset, record, "text_input"), _field(dataset, record, "text_output")
  if task == "prompt":
    return _render_prompt(dataset, record)
  if task == "mc" and "candidates" not in record:  # IconQA fill_in_blank: an open question
    task = "vqa"
  template = _choose(rng, TASK_TEMPLATES[task])
  if task == "caption":
    text_input, text_output = template, _choose(rng, _nonempty(dataset, record, "captions"))
  elif task == "vqa":
    text_input = template.replace("{Question}", _field(dataset, record, "question").strip())
    text_output = _answer(dataset, record, rng)
  elif task == "mc":
    text_input, text_output = _render_mc(dataset, record, template)
  else:  # vqg: the answer is the input, the question the target
    text_input = template.replace("{Answer}", _answer(dataset, record, rng).strip())
    text_output = _field(dataset, record, "question")
  if dataset in OCR_DATASETS and record.get("ocr_tokens"):
    text_input = inject_ocr(text_input, record["ocr_tokens"])
  return text_input, text_output


def _render_untemplated(dataset: str, record: dict, rng: np.random.Generator, instruction_format: str):
  """Multitask training without instructions: the raw input ("raw"), or behind "[Task:Dataset] " ("dataset_name")."""
  if instruction_format not in INSTRUCTION_FORMATS:
    raise ValueError(f"instruction_format={instruction_format!r}; expected one of {', '.join(INSTRUCTION_FORMATS)}")
  task = _task(dataset)
  if task is None:   # LLaVA-Instruct-150K and own texts: as they are
    return _field(dataset, record, "text_input"), _field(dataset, record, "text_output")
  if task == "mc" and "candidates" not in record:
    task = "vqa"
  if task == "caption":
    text_input, text_output = "", _choose(rng, _nonempty(dataset, record, "captions"))
  elif task == "vqa":
    text_input, text_output = _raw_text(dataset, record, "question"), _answer(dataset, record, rng)
  elif task == "vqg":
    text_input, text_output = _answer(dataset, record, rng).strip(), _field(dataset, record, "question")
  elif task == "mc":
    text_input, text_output = _render_mc(dataset, record, "{Question}")
  else:  # prompt: the record's own text, the candidate ranking scores as right as target
    text_input = _raw_text(dataset, record, PROMPT_RAW[dataset][0])
    text_output = _render_prompt(dataset, record)[1]
  if dataset in OCR_DATASETS and record.get("ocr_tokens"):
    text_input = inject_ocr(text_input, record["ocr_tokens"]).strip()
  if instruction_format == "dataset_name":
    name = TASK_NAMES[task] or PROMPT_RAW[dataset][1]
    text_input = f"[{name}:{DATASET_NAMES[dataset]}] {text_input}".strip()
  return text_input, text_output


def _raw_text(dataset: str, record: dict, key: str) -> str:
  """A raw input field, which must not be empty: only captions have an empty input on purpose."""
  value = str(_field(dataset, record, key)).strip()
  if not value:
    raise ValueError(f"{dataset} record {record.get('id', '?')!r}: its {key!r} is empty")
  return value


def _render_mc(dataset: str, record: dict, template: str) -> tuple[str, str]:
  """A multiple-choice record in a VQA template: the question with its options, the correct option as target."""
  candidates = [str(c) for c in _nonempty(dataset, record, "candidates")]
  question = MC_QUESTION.format(question=_field(dataset, record, "question").strip(),
                                options=prompts.options_text(candidates))
  text_input = template.replace("{Question}", question)
  if record.get("context"):
    text_input = CONTEXT_PREFIX.format(str(record["context"]).strip()) + text_input
  return text_input, _indexed(dataset, record, candidates, "answer_index")


def _render_prompt(dataset: str, record: dict) -> tuple[str, str]:
  """The zero-shot prompt, and as target the candidate ranking scores as right: the task's fixed candidates
  indexed by the record's label (VSR, Hateful Memes), else the record's own (Visual Dialog)."""
  candidates = list(prompts.LABEL_WORDS.get(dataset, ()))
  candidates = candidates or [str(c) for c in _nonempty(dataset, record, "candidates")]
  key = "answer_index" if "answer_index" in record else "label"
  prompt = prompts.render(prompts.ZERO_SHOT[dataset], record, f"task {dataset}")
  return prompt, _indexed(dataset, record, candidates, key)


def _indexed(dataset: str, record: dict, candidates: list, key: str) -> str:
  index = _field(dataset, record, key)
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(candidates):
    raise ValueError(f"{dataset} record {record.get('id', '?')!r}: {key}={index!r} does not index its "
                     f"{len(candidates)} candidates")
  return candidates[index]


def _task(dataset: str):
  if dataset not in DATASET_TASKS:
    raise ValueError(f"no instruction templates for dataset {dataset!r}; known: {', '.join(sorted(DATASET_TASKS))}")
  return DATASET_TASKS[dataset]


def _choose(rng: np.random.Generator, options: Sequence[str]) -> str:
  # An index rather than rng.choice: a plain str back, and one draw per call whatever the options are.
  return options[int(rng.integers(len(options)))]


def _answer(dataset: str, record: dict, rng: np.random.Generator) -> str:
  """One of the annotators' answers (frequency-weighted, as LAVIS's random.choice(answers)), else "answer"."""
  if record.get("answers"):
    return _choose(rng, list(record["answers"]))
  return _field(dataset, record, "answer")


def _field(dataset: str, record: dict, key: str):
  if key not in record:
    raise ValueError(f"{dataset} record {record.get('id', '?')!r} has no {key!r} field, which rendering needs")
  return record[key]


def _nonempty(dataset: str, record: dict, key: str) -> list:
  values = list(_field(dataset, record, key))
  if not values:
    raise ValueError(f"{dataset} record {record.get('id', '?')!r} has an empty {key!r} list")
  return values
