"""Conversations: LLaVA-Instruct's human/gpt turns, the dialog-history format, and a multi-turn prompt.

Beside the instruction templates because it is the same kind of thing: how text around an image becomes the
model's input. The LLaVA reader (readers/instruct.py) and the Visual Dialog reader render their data with these
functions, and a person's follow-up questions (inference.Chat, the servers) are rendered as that data is, so that
a conversation at inference looks like what the model was tuned on.
"""
import dataclasses
from typing import Sequence

from iblip_jax.errors import BadInput


def human_turn(text: str) -> str:
  """A human turn as the instruction data has it: the text without the <image> tag, stripped."""
  return text.replace("<image>", "").strip()


def dialog_history(exchanges: Sequence[tuple[str, str]]) -> str:
  """Earlier (question, answer) pairs in Visual Dialog's turn format, "q: ... a: ..." (X-InstructBLIP's)."""
  return " ".join(f"q: {q} a: {a}" for q, a in exchanges)


def llava_exchanges(conversation, where: str) -> list[tuple[str, str]]:
  """LLaVA-Instruct's [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...] -> [(instruction,
  reply)], the instruction rendered by human_turn. ValueError naming `where` (the file and record) and the turn
  when the turns do not alternate human, gpt or lack their fields."""
  if not isinstance(conversation, list) or not conversation or len(conversation) % 2:
    n = len(conversation) if isinstance(conversation, list) else type(conversation).__name__
    raise ValueError(f"{where}: expected alternating human/gpt turns, got {n} turns")
  out = []
  for k in range(0, len(conversation), 2):
    values = []
    for n, role in ((k, "human"), (k + 1, "gpt")):
      turn = conversation[n]
      if not isinstance(turn, dict):
        raise ValueError(f"{where}, turn {n}: expected dict, got {type(turn).__name__}")
      for key in ("from", "value"):
        if key not in turn:
          raise ValueError(f"{where}, turn {n}: missing required key {key!r}")
      if turn["from"] != role:
        raise ValueError(f"{where}, turn {n}: expected a {role!r} turn, got {turn['from']!r}")
      if not isinstance(turn["value"], str):
        raise ValueError(f"{where}, turn {n}, key 'value': expected str, got {type(turn['value']).__name__}")
      values.append(turn["value"])
    out.append((human_turn(values[0]), values[1]))
  return out


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Questions and answers about one image, ending with the question to answer: turns = (q1, a1, q2, a2, ..., qn).

  Rendered as the instruction data renders LLaVA-Instruct's human turns (human_turn), with the earlier exchanges in
  front in the turn format of the project's one multi-turn source, Visual Dialog (dialog_history; its zero-shot
  prompt's "Dialog history: ...\\n Question: ..."), without Visual Dialog's "Short answer:" so that answers can be
  long. A one-turn conversation is exactly its question. The prompt is truncated on the left like every
  instruction, so the newest question always survives."""
  turns: tuple[str, ...]

  def __post_init__(self):
    if not self.turns or len(self.turns) % 2 == 0:
      raise BadInput(f"a conversation alternates question, answer, ..., and ends with a question; got "
                     f"{len(self.turns)} turns")

  @classmethod
  def from_llava(cls, conversation: Sequence[dict]) -> "Conversation":
    """LLaVA-Instruct's format, ending with the human turn to answer (a final gpt turn, as in the dataset's files,
    is dropped: it is what is asked for)."""
    turns = list(conversation)
    if turns and turns[-1].get("from") == "gpt":
      turns = turns[:-1]
    if not turns or turns[-1].get("from") != "human":
      raise BadInput("a LLaVA conversation must end with a human turn (the question to answer)")
    try:
      exchanges = llava_exchanges(turns[:-1] + [turns[-1], {"from": "gpt", "value": ""}], "conversation")
    except ValueError as e:
      raise BadInput(str(e)) from None
    return cls(tuple(t for qa in exchanges[:-1] for t in qa) + (exchanges[-1][0],))

  def then(self, answer: str, question: str) -> "Conversation":
    """This conversation answered with `answer`, followed by `question`."""
    return Conversation(self.turns + (answer, question))

  def render(self) -> str:
    question = human_turn(self.turns[-1])
    if len(self.turns) == 1:
      return question
    pairs = [(human_turn(q), a.strip()) for q, a in zip(self.turns[:-1:2], self.turns[1::2])]
    return f"Dialog history: {dialog_history(pairs)}\n Question: {question}"


def prompt_text(prompt) -> str:
  """A prompt (a str or a Conversation) as the text the model reads; BadInput when it is empty or not text."""
  text = prompt.render() if isinstance(prompt, Conversation) else prompt
  if not isinstance(text, str):
    raise BadInput(f"a prompt is a string or a Conversation, got {type(prompt).__name__}")
  if not text.strip():
    raise BadInput("the prompt is empty: type an instruction or a question about the image")
  return text
