"""InstructBLIP: image -> ViT -> ln_vision -> Q-Former(instruction) -> projection -> LLM.

Parameter tree (top level), split by what instruction tuning trains:
  frozen:    vision, language_model
  trainable: ln_vision, query_tokens, qformer, language_projection

The Q projected visual tokens go in front of the prompt's token embeddings (LAVIS order; HF's image placeholder
tokens at the front are the same thing), and the attention mask is extended with ones. With FlanT5 they enter the
encoder; with LLaMA/Vicuna (decoder-only) the sequence is [visual tokens][prompt][target] and the model returns
logits for all of it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from iblip_jax.losses import IGNORE, shift_right
from iblip_jax.models import layers, llama
from iblip_jax.models.configs import InstructBlipConfig, dtype_of
from iblip_jax.models.llama import Llama
from iblip_jax.models.qformer import QFormer
from iblip_jax.models.t5 import T5
from iblip_jax.models.vit import VisionTransformer


class InstructBlip(nn.Module):
  config: InstructBlipConfig
  # Training with a frozen ViT sets this: no gradient flows into the vision tower (XLA would drop that backward
  # anyway when the ViT is not differentiated; this makes it explicit and cheap to check).
  stop_vision_gradient: bool = False

  def setup(self):
    cfg = self.config
    q = cfg.qformer
    self.vision = VisionTransformer(cfg.vision)
    # LAVIS's ln_vision (HF: vision_model.post_layernorm). Trainable, so it lives with the Q-Former side and
    # shares its dtypes.
    self.ln_vision = layers.layer_norm(cfg.vision.layer_norm_eps, dtype=dtype_of(q.dtype),
                                       param_dtype=dtype_of(q.param_dtype))
    self.query_tokens = self.param(
        "query_tokens", nn.with_logical_partitioning(layers.default_kernel_init, (None, None, "embed")),
        (1, cfg.num_query_tokens, q.hidden_size), dtype_of(q.param_dtype))
    self.qformer = QFormer(q)
    self.language_projection = layers.dense(cfg.text.d_model, ("embed", "llm_embed"), dtype=dtype_of(q.dtype),
                                            param_dtype=dtype_of(q.param_dtype), lora=q.lora)
    self.language_model = Llama(cfg.text) if cfg.decoder_only else T5(cfg.text)

  def image_features(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None,
                     deterministic: bool = True):
    """Returns {"image_embeds": (B, N, Dv) after ln_vision, "query_output": (B, Q, Dq),
    "language_inputs": (B, Q, D_llm)}. pixel_values: (B, H, W, 3), normalised; or (B / K, H, W, 3) with K
    consecutive instructions per image (_per_row; images only, a video batch has one instruction per video)."""
    vision_out = self.vision(pixel_values)
    if self.stop_vision_gradient:
      vision_out = jax.lax.stop_gradient(vision_out)
    image_embeds = self.ln_vision(vision_out)
    if not self.config.instruction_aware:
      qformer_input_ids = qformer_attention_mask = None
    elif qformer_input_ids is None:
      raise ValueError("the instruction-aware Q-Former needs qformer_input_ids "
                       "(or build the model with instruction_aware=False)")
    else:   # several instructions per image: the ViT ran once per image, the Q-Former runs once per instruction
      image_embeds = _per_row(image_embeds, qformer_input_ids.shape[0])
    queries = jnp.broadcast_to(self.query_tokens, (image_embeds.shape[0],) + self.query_tokens.shape[1:])
    query_output = self.qformer(queries, image_embeds, qformer_input_ids, qformer_attention_mask, deterministic)
    return {"image_embeds": image_embeds, "query_output": query_output,
            "language_inputs": self.language_projection(query_output)}

  def visual_tokens(self, pixel_values, qformer_input_ids, qformer_attention_mask, deterministic: bool = True):
    """(B, H, W, 3) image -> (B, Q, D_llm); (B, T, H, W, 3) video -> (B, T*Q, D_llm): every frame goes through the
    ViT and the Q-Former with the same instruction, and the frames' tokens are concatenated (paper: T = 4)."""
    if pixel_values.ndim == 4:
      return self.image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                 deterministic)["language_inputs"]
    b, t = pixel_values.shape[:2]
    per_frame = lambda x: None if x is None else jnp.repeat(x, t, axis=0)  # rows b*t + j = frame j of item b
    tokens = self.image_features(pixel_values.reshape((b * t,) + pixel_values.shape[2:]),
                                 per_frame(qformer_input_ids), per_frame(qformer_attention_mask),
                                 deterministic)["language_inputs"]
    return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])

  def llm_inputs(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                 deterministic: bool = True):
    """[visual tokens][prompt embeddings] (B, V + L, D) and their mask (B, V + L), V = Q (or T*Q for video)."""
    visual = _per_row(self.visual_tokens(pixel_values, qformer_input_ids, qformer_attention_mask, deterministic),
                      input_ids.shape[0])
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    embeds = jnp.concatenate([visual.astype(dtype_of(self.config.text.dtype)),
                              self.language_model.embed(input_ids)], axis=1)
    mask = jnp.concatenate([jnp.ones(visual.shape[:2], jnp.int32), attention_mask.astype(jnp.int32)], axis=1)
    return embeds, mask

  def encode(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
             deterministic: bool = True):
    """FlanT5: runs everything up to the T5 encoder. Returns (encoded (B, V + L, D), encoder mask (B, V + L))."""
    embeds, mask = self.llm_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                   attention_mask, deterministic)
    return self.language_model.encode(embeds, mask, deterministic), mask.astype(bool)

  # --- one interface over both language models: the loss, generation and ranking call only these ----------------

  @property
  def llm_class(self):
    """The language model's class, for its pure cache functions (repeat_cache, reorder_cache)."""
    return Llama if self.config.decoder_only else T5

  def target_logits(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                    labels, decoder_attention_mask=None, deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits (B, T, V) that predict each position of `labels` (B, T), -100 where ignored.
    FlanT5: the decoder over the shifted labels. Decoder-only: input_ids hold [prompt][target] and labels mark the
    target positions; the logit before each token predicts it, behind the V visual tokens."""
    if self.config.decoder_only:
      logits = self(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                    deterministic=deterministic)
      v = logits.shape[1] - input_ids.shape[1]
      return logits[:, v - 1:-1]
    text = self.config.text
    return self(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                decoder_input_ids=shift_right(labels, text.decoder_start_token_id, text.pad_token_id),
                decoder_attention_mask=decoder_attention_mask, deterministic=deterministic)

  def packed_target_logits(self, pixel_values, qformer_input_ids, qformer_attention_mask, packed: dict,
                           deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits (R, L or T, V) over packed rows (data/packing.py: several examples share a row), aligned
    with packed["labels"]. The ViT and the Q-Former run per example (B of them, as unpacked); example b's V visual
    tokens are placed where packed["visual_slots"] (R, L) says b * V + j (-1 on text), in front of its prompt, in
    its own segment. The rows then go through the LLM with segment ids (and LLaMA with per-example positions), so
    each example sees exactly what it sees alone (decoder-only labels are already shifted: the logit at i predicts labels[i])."""
    visual = self.visual_tokens(pixel_values, qformer_input_ids, qformer_attention_mask, deterministic)
    flat = visual.reshape(-1, visual.shape[-1]).astype(dtype_of(self.config.text.dtype))     # (B * V, D)
    slots = packed["visual_slots"]
    text = self.language_model.embed(packed["input_ids"])
    embeds = jnp.where((slots >= 0)[..., None], flat[jnp.maximum(slots, 0)], text)           # (R, L, D)
    if self.config.decoder_only:
      return self.language_model(embeds, None, packed["positions"], packed["segment_ids"])
    text = self.config.text
    start = packed["decoder_positions"] == 0     # each example's targets start its decoder from the start token
    decoder_input_ids = jnp.where(start, text.decoder_start_token_id,
                                  shift_right(packed["labels"], text.decoder_start_token_id, text.pad_token_id))
    return self.language_model.packed_logits(embeds, packed["segment_ids"], decoder_input_ids,
                                             packed["decoder_segment_ids"], deterministic)

  def prefill(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
              max_new_tokens: int):
    """Everything before the first generated token, once per sample -> (first decoder input (B,), cache, (B, V)
    ids the repetition penalty counts as already generated). FlanT5 starts from the decoder start token; a
    decoder-only LLM from the last prompt token, the prompt left-aligned (any padding side in), and every prompt id
    (and the image placeholder id) counts as seen, as in transformers' generate."""
    cfg = self.config
    b, vocab = input_ids.shape[0], cfg.text.vocab_size
    if not cfg.decoder_only:
      encoded, mask = self.encode(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask)
      start = cfg.text.decoder_start_token_id
      seen = jnp.zeros((b, vocab), bool).at[:, start].set(True)
      return jnp.full((b,), start, jnp.int32), self.language_model.prefill(encoded, mask, max_new_tokens), seen
    ids, prompt_mask = llama.left_align(input_ids, attention_mask)
    embeds, mask = self.llm_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, ids, prompt_mask)
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].set(True)
    for placeholder in (cfg.image_token_index, cfg.video_token_index):
      if placeholder is not None and placeholder < vocab:
        seen = seen.at[:, placeholder].set(True)
    return ids[:, -1].astype(jnp.int32), self.language_model.prefill(embeds, mask, max_new_tokens), seen

  def step(self, token, t, cache):
    """token (B,) fed as generation input number `t` (a scalar, or (B,): each row at its own step) -> (next-token
    logits (B, V) f32, updated cache)."""
    return self.language_model.step(token, t, cache)

  def candidate_logits(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                       candidate_labels) -> jax.Array:
    """Logits (B*C, N, V) that predict each token of every sample's C candidate answers (B, C, N), -100 padded:
    the image, Q-Former and prompt once per sample. FlanT5: the decoder over each candidate. Decoder-only:
    [visual][left-aligned prompt][candidate], positions cumsum(mask) - 1 (those of LAVIS's right-padded
    concatenation)."""
    b, c, n = candidate_labels.shape
    labels = candidate_labels.reshape(b * c, n)
    valid = labels != IGNORE
    text = self.config.text
    if not self.config.decoder_only:
      encoded, mask = self.encode(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask)
      # each sample's encoder output, projected to cross-attention keys/values once, serves its C candidates
      return self.language_model.decode(shift_right(labels, text.decoder_start_token_id, text.pad_token_id),
                                        encoded, mask, valid.astype(jnp.int32))
    ids, prompt_mask = llama.left_align(input_ids, attention_mask)
    embeds, mask = self.llm_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, ids, prompt_mask)
    # [visual][prompt] once per sample; its last position predicts each candidate's first token, and the candidates
    # (all but their last token) continue from its keys/values, shared by the sample's C candidates
    first, prompt = self.language_model.prompt(embeds, mask)
    first = jnp.repeat(first, c, axis=0)[:, None]
    if n == 1:
      return first
    cand = self.language_model.embed(jnp.where(valid, labels, text.pad_token_id))[:, :n - 1]
    rest = self.language_model.continuation_logits(prompt, cand, valid[:, :n - 1].astype(jnp.int32))
    return jnp.concatenate([first.astype(rest.dtype), rest], axis=1)

  def __call__(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
               decoder_input_ids=None, decoder_attention_mask=None, deterministic: bool = True) -> jax.Array:
    """Teacher-forced forward pass -> LM logits: FlanT5 (B, T, V) over the decoder inputs; decoder-only
    (B, V + L, V) over [visual tokens][input_ids] (input_ids then hold prompt and target)."""
    if self.config.decoder_only:
      if decoder_input_ids is not None:
        raise ValueError("a decoder-only LLM takes prompt and target together in input_ids; got decoder_input_ids")
      embeds, mask = self.llm_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                     attention_mask, deterministic)
      return self.language_model(embeds, mask)
    if decoder_input_ids is None:
      raise ValueError("FlanT5 needs decoder_input_ids (the shifted targets)")
    encoded, mask = self.encode(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                attention_mask, deterministic)
    return self.language_model.decode(decoder_input_ids, encoded, mask, decoder_attention_mask, deterministic)


def _per_row(x, rows: int):
  """x (N, ...) for N images -> (rows, ...), row r reading image r // (rows / N): a batch may hold each image once
  and ask it K consecutive prompts (bulk annotation), so that the ViT runs once per image."""
  n = x.shape[0]
  if n == rows:
    return x
  if rows % n:
    raise ValueError(f"{n} images for {rows} prompts: each image must have the same number of consecutive rows")
  return jnp.repeat(x, rows // n, axis=0)


PACKED_PREFIX = "packed_"   # a training batch's packed LLM rows (data/packing.py), named packed_<field>


def packed_fields(batch: dict) -> dict | None:
  """{field: array} of a batch's packed rows, prefix dropped (what packed_target_logits takes); None unpacked."""
  if PACKED_PREFIX + "segment_ids" not in batch:
    return None
  return {k[len(PACKED_PREFIX):]: v for k, v in batch.items() if k.startswith(PACKED_PREFIX)}


def dummy_inputs(cfg: InstructBlipConfig, batch: int = 1) -> dict[str, jax.Array]:
  """Smallest inputs that touch every parameter (for init and eval_shape)."""
  size = cfg.vision.image_size
  one = jnp.ones((batch, 1), jnp.int32)
  return dict(pixel_values=jnp.zeros((batch, size, size, cfg.vision.num_channels), jnp.float32),
              qformer_input_ids=one, qformer_attention_mask=one, input_ids=one, attention_mask=one,
              decoder_input_ids=None if cfg.decoder_only else one)


def init_fn(model: InstructBlip):
  """rng -> boxed params (with logical axis metadata), for jax.eval_shape or a sharded jax.jit."""
  def init(rng):
    return model.init(rng, **dummy_inputs(model.config))["params"]
  return init


def params_shape(model: InstructBlip, *, boxed: bool = False):
  """The parameter tree as ShapeDtypeStructs, without allocating anything."""
  shape = jax.eval_shape(init_fn(model), jax.random.key(0))
  return shape if boxed else nn.meta.unbox(shape)
