"""An lmms-eval model (github.com/EvolvingLMMs-Lab/lmms-eval, the `lmms` extra) answering on iblip_jax's engine:

  python -m lmms_eval --model iblip_jax --model_args pretrained=DIR[,dtype=bfloat16,quantize=int8,adapter=PEFT_DIR,
      max_new_tokens=64,num_beams=1] --tasks mme,pope --batch_size 8 --output_path results/

It is found through the `lmms_eval.models` entry point that setup.cfg declares (no lmms-eval fork, no plugin path).
`pretrained` is what Pipeline.from_pretrained takes: a Hugging Face InstructBLIP (or InstructBLIP-Video) directory or
a training workdir. lmms-eval's --batch_size is the engine's batch (requests are batched and padded to a few shapes
here, iblip_jax.engine; "auto" = 8); its --device is not used: JAX places the model on its default device
(JAX_PLATFORMS chooses the platform).

- generate_until: each request's visuals (lmms-eval's doc_to_visual: PIL images, or a video file path) with its
  context as the instruction; one image is an image, several are concatenated in order as Images(...) (zero-shot:
  the released weights saw one image), a video is its 4 uniformly sampled frames. Generation settings: the task's
  generation_kwargs (max_new_tokens, temperature (0 = greedy), top_p, top_k, num_beams, do_sample,
  repetition_penalty, ...) over --model_args' defaults (greedy); the answer is cut at the first `until` string.
- loglikelihood: -log p(continuation | visuals, context), the negative log-likelihood summed over the continuation's
  tokens, as iblip_jax's candidate ranking scores an answer (every continuation of one context ranked in one call;
  the leading delimiter space dropped, since a candidate is tokenised on its own); is_greedy: whether greedy decoding
  gives that continuation. Negative because lmms-eval 0.7 picks a multiple-choice answer by the smallest value (its
  own models return a loss there: api/task.py uses argmin, lmms-eval issue #370); log p itself would rank backwards.
- A record whose image cannot be read answers "" (generation) or an infinite loss (log-likelihood), with a warning
  naming it: the other records go on.
"""
import collections
import logging
from typing import Sequence

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from iblip_jax.data import video_files
from iblip_jax.decoding import Decoding
from iblip_jax.engine import Item
from iblip_jax.errors import BadInput
from iblip_jax.inference import Pipeline

log = logging.getLogger(__name__)

MODEL_ID = "iblip_jax"
# generation_kwargs keys that are lmms-eval's bookkeeping, not decoding settings
_NOT_DECODING = frozenset(("until", "image_aspect_ratio", "image_sizes", "modalities", "use_cache"))


def manifest() -> ModelManifest:
  """The `lmms_eval.models` entry point (setup.cfg): how lmms-eval finds this model."""
  return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.IblipJax")


def _number(value, kind):
  return kind(value) if isinstance(value, str) else value


class IblipJax(lmms):
  """lmms-eval's model interface over iblip_jax.inference.Pipeline's engine (see the module docstring)."""

  def __init__(self, pretrained: str, batch_size: int | str = 8, dtype: str | None = None,
               quantize: str | None = None, adapter: str | None = None, max_new_tokens: int | str = 64,
               num_beams: int | str = 1, repetition_penalty: float | str = 1.0, max_batch_size=None, device=None,
               **unknown) -> None:
    super().__init__()
    if unknown:
      raise BadInput(f"--model_args {sorted(unknown)}: not iblip_jax settings; known: pretrained, dtype, quantize, "
                     "adapter, max_new_tokens, num_beams, repetition_penalty (the batch is lmms-eval's --batch_size)")
    if device is not None:
      log.info("lmms-eval --device=%s is not used: JAX places the model on its default device", device)
    batch = 8 if batch_size in ("auto", None) else int(str(batch_size).split(":")[0])
    self.pipe = Pipeline.from_pretrained(pretrained, dtype, max_batch=batch, quantize=quantize or None,
                                         adapter=adapter or None)
    self.defaults = Decoding(num_beams=_number(num_beams, int), max_new_tokens=_number(max_new_tokens, int),
                             min_new_tokens=1, repetition_penalty=_number(repetition_penalty, float)).checked()

  # -- inputs --

  def _item(self, visuals, context: str) -> Item:
    """One request's visual input and instruction as an engine item (lmms-eval's <image> markers dropped: the query
    outputs always come before the prompt)."""
    visuals = [v for v in (visuals or []) if v is not None]
    prompt = context.replace("<image>", " ").strip()
    if not visuals:
      raise BadInput(f"a request without an image or video ({prompt[:80]!r}): InstructBLIP answers about one")
    if len(visuals) == 1 and video_files.is_video_file(visuals[0]):
      return Item(visuals[0], prompt, frames=video_files.FRAMES)
    if len(visuals) == 1:
      return Item(visuals[0], prompt)
    return Item(list(visuals), prompt, frames=len(visuals))

  def _visuals(self, doc_to_visual, doc_id, task, split):
    return doc_to_visual(self.task_dict[task][split][doc_id])

  def _settings(self, gen_kwargs: dict) -> tuple[list[str], Decoding]:
    """A task's generation_kwargs -> (its stop strings, the Decoding: the kwargs over --model_args' defaults)."""
    until = gen_kwargs.get("until") or []
    return ([until] if isinstance(until, str) else list(until)), self._decoding(gen_kwargs)

  def _decoding(self, gen_kwargs: dict) -> Decoding:
    settings = {k: v for k, v in gen_kwargs.items() if k not in _NOT_DECODING}
    if settings.get("top_p") is None:
      settings.pop("top_p", None)
    if float(settings.get("temperature", 0) or 0) > 0:
      settings.setdefault("do_sample", True)
    else:
      settings.pop("temperature", None)
    return Decoding.of(settings, base=self.defaults)

  # -- lmms-eval's interface --

  def generate_until(self, requests) -> list[str]:
    groups = collections.defaultdict(list)   # one engine call per distinct generation setting
    for i, request in enumerate(requests):
      context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
      groups[repr(sorted(gen_kwargs.items()))].append(i)
    out: list[str] = [""] * len(requests)
    for indices in groups.values():
      gen_kwargs = dict(requests[indices[0]].args[1])
      until, decoding = self._settings(gen_kwargs)
      items = [self._item(self._visuals(*requests[i].args[2:]), requests[i].args[0]) for i in indices]
      outputs = self.pipe.engine.generate(items, decoding, progress=f"lmms-eval generate ({len(items)})")
      for i, o in zip(indices, outputs):
        if o.error:
          log.warning("lmms-eval %s doc %s: cannot read its visual input (%s); answered \"\"",
                      requests[i].args[4], requests[i].args[3], o.error)
          continue
        out[i] = _cut(o.answers[0].text, until)
        self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), out[i])
    return out

  def loglikelihood(self, requests) -> list:
    groups = collections.defaultdict(list)   # the continuations of one (doc, context) ranked together
    for i, request in enumerate(requests):
      context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
      groups[(task, split, doc_id, context)].append(i)
    keys = list(groups)
    items, candidates = [], []
    for key in keys:
      first = requests[groups[key][0]].args
      items.append(self._item(self._visuals(*first[2:]), first[0]))
      candidates.append([self._continuation(requests[i].args) for i in groups[key]])
    ranked = self.pipe.engine.rank(items, candidates, progress=f"lmms-eval loglikelihood ({len(requests)})")
    greedy = self.pipe.engine.generate(
        items, Decoding(num_beams=1, repetition_penalty=1.0, min_new_tokens=1,
                        max_new_tokens=max(self._length(c) for cs in candidates for c in cs) + 1),
        progress=None)
    out: list[tuple[float, bool]] = [(float("inf"), False)] * len(requests)
    for key, cands, item_scores, answer in zip(keys, candidates, ranked, greedy):
      if item_scores.error:
        log.warning("lmms-eval %s doc %s: cannot read its visual input (%s); loss inf", key[0], key[2],
                    item_scores.error)
        continue
      for i, score, candidate in zip(groups[key], item_scores.scores, cands):
        out[i] = (-score, answer.answers[0].text.strip() == candidate.strip())
    # Each pair wrapped: lmms-eval 0.7.3's evaluator passes a GenerationResult's text through as it is, but turns any
    # other non-string answer, a (log-likelihood, is_greedy) pair included, into its str() (api/instance.py,
    # unwrap_generation_output), which its multiple-choice scoring then cannot unpack.
    return [GenerationResult(text=pair) for pair in out]

  def generate_until_multi_round(self, requests) -> list[list[str]]:
    """Each request's rounds in turn (a round's context needs the previous answers): round 0 from the request's
    context and visuals, each next one from the task's doc_to_text(doc, previous_output=..., round_idx=...,
    previous_round_info=...) -> (visuals, context, terminal, round answers, round info), until it says terminal.
    Returns each request's list of round answers."""
    out = []
    for request in requests:
      context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
      doc = self.task_dict[task][split][doc_id]
      until, decoding = self._settings(gen_kwargs)
      visuals, answers, info, round_idx = doc_to_visual(doc), [], None, 0
      while True:
        [o] = self.pipe.engine.generate([self._item(visuals, context)], decoding)
        answers.append("" if o.error else _cut(o.answers[0].text, until))
        round_idx += 1
        visuals, context, terminal, answers, info = doc_to_text(doc, previous_output=list(answers),
                                                                round_idx=round_idx, previous_round_info=info)
        answers = list(answers)
        if terminal:
          break
      out.append(answers)
    return out

  # -- helpers --

  def _continuation(self, args) -> str:
    context, doc_to_target, doc_to_visual, doc_id, task, split = args
    target = doc_to_target(self.task_dict[task][split][doc_id]) if callable(doc_to_target) else doc_to_target
    text = str(target).lstrip()
    if not text:
      raise BadInput(f"lmms-eval {task} doc {doc_id}: an empty continuation cannot be ranked")
    return text

  def _length(self, text: str) -> int:
    return len(self.pipe.tok.llm(text, add_special_tokens=False)["input_ids"])


def _cut(text: str, until: Sequence[str]) -> str:
  """The answer up to the first stop string (lmms-eval's `until`)."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text
