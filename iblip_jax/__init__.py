"""InstructBLIP in JAX/Flax: frozen EVA ViT + instruction-aware Q-Former + frozen FlanT5 or Vicuna (LLaMA).

    model, params = iblip_jax.from_pretrained(path, dtype=jnp.float32)
    logits = model.apply({"params": params}, pixel_values, qformer_input_ids, qformer_attention_mask,
                         input_ids, attention_mask, decoder_input_ids=..., decoder_attention_mask=...)
    iblip_jax.save_pretrained(model, params, out_dir)

The package, by layer (a module imports only from the layers above it):
  models/                       the Flax modules (ViT, Q-Former, T5, LLaMA, InstructBlip with one interface over
                                both LLMs: target_logits, prefill/step, candidate_logits) and their config dataclasses
  losses, trainable, optim      token losses; the trainable/frozen split; AdamW with LAVIS's schedule
  sharding, distributed         the device mesh and logical axis rules; multi-process start-up and host exchanges
  safetensors_io, hf_checkpoint, pretrained
                                the Hugging Face format: region reads, the name table, from_pretrained/save_pretrained
  train_step, train_state       the step's maths; the training state built once (shardings, jit, abstract form)
  decoding, ranking, sampling   generation (greedy, beam; sampling, best-of-n, streaming) and candidate ranking over
                                the model's interface
  checkpoints                   orbax checkpoints with verification
  data/                         preprocessing, tokenisation, templates, readers, sources, mixture, input pipeline
  evaluation/                   metrics, the task table, the evaluator on a mesh, the paper's numbers, the Table 1 report
  run/                          the main job: settings, command line, one module per mode, logger, workdir lock
  demo/                         the embedded demo's shapes dataset and word-level tokenizers (not the library)
  inference, attention_maps, serve
                                for people: Pipeline (images + instructions -> answers, streaming, chat), the
                                Q-Former's attention and answer-relevance maps, the local web demo
"""
from iblip_jax.hf_checkpoint import CheckpointError
from iblip_jax.models.configs import InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config, VisionConfig
from iblip_jax.models.instructblip import InstructBlip
from iblip_jax.decoding import generate
from iblip_jax.pretrained import from_pretrained, params_shape, save_pretrained
from iblip_jax.ranking import rank

__all__ = ["CheckpointError", "generate", "rank", "InstructBlip", "InstructBlipConfig", "LlamaConfig", "QFormerConfig",
           "T5Config", "VisionConfig", "from_pretrained", "params_shape", "save_pretrained", "Pipeline"]


def __getattr__(name):  # the one-call API (inference.py) imports transformers' tokenizers (~3 s): only when used
  if name == "Pipeline":
    from iblip_jax.inference import Pipeline
    return Pipeline
  raise AttributeError(f"module 'iblip_jax' has no attribute {name!r}")
