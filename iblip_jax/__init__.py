"""InstructBLIP in JAX/Flax: frozen EVA ViT + instruction-aware Q-Former + frozen FlanT5 or Vicuna (LLaMA).

    model, params = iblip_jax.from_pretrained(path, dtype=jnp.float32)
    logits = model.apply({"params": params}, pixel_values, qformer_input_ids, qformer_attention_mask,
                         input_ids, attention_mask, decoder_input_ids=..., decoder_attention_mask=...)
    iblip_jax.save_pretrained(model, params, out_dir)
    pipe = iblip_jax.Pipeline.from_pretrained(path); pipe("photo.jpg", "What is in it?")

The package, by layer, bottom to top: a module imports only from its own layer and the layers below it
(tests/test_layers.py checks it on every module):
  errors, extras, prompts, chips
                                exception types; optional packages; the prompt catalogue; TPU chips' figures
  losses                        token losses and log-likelihoods
  models/                       the Flax modules (ViT, Q-Former, T5, LLaMA, InstructBlip with one interface over
                                both LLMs: target_logits, prefill/step, candidate_logits), their configs, init
  trainable, lora, optim, sharding, distributed
                                the trainable/frozen split; LoRA adapters as parameters (fresh ones, checks, folding);
                                AdamW with LAVIS's schedule; the device mesh and logical axis rules; multi-process
                                start-up and host exchanges
  hf/                           the Hugging Face format: name table, safetensors, config.json, params, BLIP-2 start,
                                from_pretrained / save_pretrained
  train_step, train_state, checkpoints, step_flops
                                the step's maths; the training state built once; orbax checkpoints, verified; the
                                step's FLOPs counted by XLA
  sampling, decoding, ranking   the decoding loop (greedy, sampling, streaming), beam search and the Decoding
                                settings, candidate ranking
  data/                         images (the one image path), preprocessing, tokenisation, templates, LAVIS cleaning,
                                conversations, readers, sources, mixture, the training input pipeline,
                                sequence packing
  attention_maps                the Q-Former's attention and answer-relevance maps
  engine, slots                 the inference engine: items in, answers or scores out, on a device, mesh or pod;
                                continuous batching (decode slots that requests join and leave between steps)
  evaluation/                   metrics, the task table, the evaluator, the paper's numbers, the Table 1 report
  run/, config_lib              the main job: settings, command line, one module per mode, logger, workdir lock;
                                what config files share
  demo/                         the embedded demo's shapes dataset and word-level tokenizers (not the library)
  inference/, serve, serve_api, for people: Pipeline, Chat, the terminal; the local web demo; the OpenAI-compatible
  lmms_eval_model               API over the slots; the lmms-eval harness's `--model iblip_jax`
  aot/                          ahead-of-time compilation for TPU topologies and the step model (tools/aot_compile.py)
"""
from iblip_jax.decoding import generate
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import from_pretrained, save_pretrained
from iblip_jax.inference import Pipeline
from iblip_jax.models.configs import InstructBlipConfig, LlamaConfig, QFormerConfig, T5Config, VisionConfig
from iblip_jax.models.instructblip import InstructBlip, params_shape
from iblip_jax.ranking import rank

__all__ = ["CheckpointError", "generate", "rank", "InstructBlip", "InstructBlipConfig", "LlamaConfig", "QFormerConfig",
           "T5Config", "VisionConfig", "from_pretrained", "params_shape", "save_pretrained", "Pipeline"]
