"""`Chat`: a conversation about one image (or several, or a video's frames), for people (Pipeline.chat, the terminal,
the web demo).

Each question is asked with the earlier turns in the prompt, rendered as the instruction data renders them
(data/conversation.py); each answer is recorded when it is complete, streamed or not.
"""
from iblip_jax.data.conversation import Conversation, prompt_text
from iblip_jax.engine import Stream


class Chat:
  """ask() and stream() put the earlier turns into the prompt and record the answer; reset() starts over."""

  def __init__(self, pipe, image, decoding_settings: dict):
    """`image`: a PreparedImage, or Images of them (several images, or a video's sampled frames)."""
    self.pipe, self.image, self.settings = pipe, image, dict(decoding_settings)
    self.turns: list[str] = []

  def _conversation(self, question: str) -> Conversation:
    prompt_text(question)
    return Conversation(tuple(self.turns) + (question,))

  def ask(self, question: str, **decoding_settings) -> str:
    answer = self.pipe(self.image, self._conversation(question), **{**self.settings, **decoding_settings})
    self.turns += [question, answer if isinstance(answer, str) else answer[0]]
    return self.turns[-1]

  def stream(self, question: str, **decoding_settings) -> Stream:
    stream = self.pipe.stream(self.image, self._conversation(question), **{**self.settings, **decoding_settings})
    stream.on_answer = lambda answer: self.turns.extend([question, answer.text])
    return stream

  def reset(self) -> None:
    self.turns.clear()
