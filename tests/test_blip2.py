"""Starting from BLIP-2, as the paper does: transformers' BLIP-2 checkpoints (stage 2 Blip2ForConditionalGeneration,
stage 1 Blip2ForImageTextRetrieval, tiny and re-randomised) -> iblip_jax.

The oracle is transformers itself: BLIP-2's own forward for the query side, the stage-1 tensors for the text side,
and InstructBlipForConditionalGeneration loading what iblip_jax exports after a training step."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          InstructBlipForConditionalGeneration)

import iblip_jax
import oracle
import train_helper
from iblip_jax import hf, sharding, train_state
from iblip_jax import trainable as trainable_lib
from iblip_jax.errors import CheckpointError
from iblip_jax.hf import blip2 as hf_blip2, params as hf_params
from iblip_jax.models import instructblip

RULES = [tuple(r) for r in train_helper.load_config("tiny").sharding_rules]


def _configs(**qformer) -> tuple[dict, dict, dict]:
  """The tiny InstructBLIP oracle's sizes, as BLIP-2 sub-configs."""
  base = oracle.tiny_hf_config()
  q = {k: v for k, v in base.qformer_config.to_dict().items()
       if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "cross_attention_frequency")}
  return base.vision_config.to_dict(), {**q, **qformer}, base.text_config.to_dict()


def _rerandomise(model, seed: int):
  """As tests/oracle.py: transformers' init hides bugs (zero query tokens, unit LayerNorms, tiny vision weights)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("qkv.bias"):
        p.normal_(0, 0.1)
        p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
      elif "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0, 0.1)
  return model.eval()


def stage2_model(seed: int = 0, llama: bool = False) -> Blip2ForConditionalGeneration:
  """FlanT5, or with `llama` a LLaMA language model: the paper's Vicuna BLIP-2 (not released, LAVIS #292)."""
  vision, qformer, text = _configs()
  if llama:
    text = oracle.tiny_hf_llama_config().text_config.to_dict()
  cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                    num_query_tokens=oracle.NUM_QUERY, image_token_index=oracle.IMAGE_TOKEN)
  model = Blip2ForConditionalGeneration(cfg)
  model.set_attn_implementation("eager")
  if not llama:   # a separate head, as the released FlanT5 checkpoints have
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
  return _rerandomise(model, seed)


def stage1_model(seed: int = 1, **qformer) -> Blip2ForImageTextRetrieval:
  vision, q, _ = _configs(use_qformer_text_input=True, **qformer)
  cfg = Blip2Config(vision_config=vision, qformer_config=q, num_query_tokens=oracle.NUM_QUERY,
                    image_text_hidden_size=16)
  return _rerandomise(Blip2ForImageTextRetrieval(cfg), seed)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("blip2")
  two, one = stage2_model(), stage1_model()
  two.save_pretrained(root / "stage2")
  one.save_pretrained(root / "stage1")
  assert "language_model.lm_head.weight" in two.state_dict()
  return root, two, one


def _t(x) -> np.ndarray:
  return x.detach().float().numpy()


@pytest.mark.parametrize("llm", ["t5", "llama"])
def test_stage2_query_side_equals_blip2(dirs, tmp_path, llm):
  """instruction_aware=False: BLIP-2's Q-Former (queries only). Query outputs, projected visual tokens and the
  LLM's logits equal transformers' Blip2ForConditionalGeneration on the same image; no stage 1 is needed."""
  root, two, _ = dirs
  if llm == "llama":
    two = stage2_model(seed=3, llama=True)
    two.save_pretrained(tmp_path / "stage2")
    root = tmp_path
  model, params = iblip_jax.from_pretrained(str(root / "stage2"), instruction_aware=False)
  assert model.config.decoder_only == (llm == "llama")
  batch = oracle.tiny_batch()
  ours = model.apply({"params": params}, jnp.asarray(batch["pixel_values"]), method="image_features")
  with torch.no_grad():
    hf = two.get_image_features(pixel_values=torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(ours["query_output"]), _t(hf.qformer_outputs.last_hidden_state), atol=2e-5)
  np.testing.assert_allclose(np.asarray(ours["language_inputs"]), _t(hf.pooler_output), atol=2e-5)
  if llm == "llama":   # [visual][prompt] logits; padded prompt positions are not compared
    batch = {k: v for k, v in batch.items() if not k.startswith("decoder")}
  logits = np.asarray(model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()}))
  want = _t(oracle.hf_forward(two, {k: v for k, v in batch.items() if not k.startswith("qformer_")}).logits)
  if llm == "llama":
    real = np.concatenate([np.ones((3, oracle.NUM_QUERY)), batch["attention_mask"]], 1).astype(bool)
    logits, want = logits[real], want[real]
  np.testing.assert_allclose(logits, want, atol=5e-5)


def _text_side_leaves(params) -> dict[str, np.ndarray]:
  q = params["qformer"]
  out = {"qformer.embeddings.word_embeddings.weight": q["word_embeddings"]["embedding"],
         "qformer.embeddings.position_embeddings.weight": q["position_embeddings"]["embedding"]}
  for i in range(3):
    ffn = q[f"layer_{i}"]["ffn"]
    out[f"qformer.encoder.layer.{i}.intermediate.dense.weight"] = ffn["intermediate"]["kernel"].T
    out[f"qformer.encoder.layer.{i}.output.dense.weight"] = ffn["output"]["kernel"].T
    out[f"qformer.encoder.layer.{i}.output.LayerNorm.weight"] = ffn["output_ln"]["scale"]
  return {k: np.asarray(v) for k, v in out.items()}


def test_stage1_gives_the_text_side_stage2_everything_else(dirs, caplog):
  root, two, one = dirs
  caplog.set_level(logging.INFO, logger="iblip_jax")
  model, params = iblip_jax.from_pretrained(str(root / "stage2"), stage1=str(root / "stage1"))
  assert model.config.instruction_aware and model.config.qformer.vocab_size == 99
  s1, s2 = one.state_dict(), two.state_dict()
  for name, value in _text_side_leaves(params).items():   # the text side: stage 1's tensors
    stage1_name = name.replace("qformer.embeddings.", "embeddings.")
    np.testing.assert_array_equal(value, _t(s1[stage1_name]), err_msg=name)
  q = params["qformer"]
  # shared self-attention, cross-attention, query feed-forward, embedding LayerNorm: stage 2 (LAVIS's second load)
  np.testing.assert_array_equal(np.asarray(q["layer_0"]["attention"]["query"]["kernel"]).T,
                                _t(s2["qformer.encoder.layer.0.attention.attention.query.weight"]))
  np.testing.assert_array_equal(np.asarray(q["layer_2"]["crossattention"]["value"]["kernel"]).T,
                                _t(s2["qformer.encoder.layer.2.crossattention.attention.value.weight"]))
  np.testing.assert_array_equal(np.asarray(q["layer_1"]["ffn_query"]["output"]["kernel"]).T,
                                _t(s2["qformer.encoder.layer.1.output_query.dense.weight"]))
  np.testing.assert_array_equal(np.asarray(q["embed_ln"]["scale"]), _t(s2["qformer.layernorm.weight"]))
  np.testing.assert_array_equal(np.asarray(params["query_tokens"]), _t(s2["query_tokens"]))
  np.testing.assert_array_equal(np.asarray(params["ln_vision"]["bias"]), _t(s2["vision_model.post_layernorm.bias"]))
  assert not np.array_equal(_t(s1["query_tokens"]), _t(s2["query_tokens"]))   # so the check above means something
  assert "loaded" not in caplog.text   # from_pretrained is quiet; the main job's load says where things came from
  # the main job's path: one line names both sources; each file byte it needs is read once, on any mesh
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings = sharding.logical_shardings(instructblip.params_shape(model, boxed=True), mesh, RULES)
  reader, origin = hf.open_reader(str(root / "stage2"), model, str(root / "stage1"))
  meshed = hf_params.load_params(instructblip.params_shape(model), reader, shardings=shardings)
  assert reader.bytes_read == sum(reader.nbytes(k) for k in reader.keys())
  assert set(reader.origin.values()) == {"stage 1", "stage 2"}
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(meshed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  hf.load_params(str(root / "stage2"), model, progress=True, stage1=str(root / "stage1"))
  line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model_init:")]
  assert len(line) == 1 and str(root / "stage2") in line[0] and f"stage 1 {root / 'stage1'}" in line[0], line


@pytest.mark.slow   # compiles the training step (~20 s on 2 cores)
def test_trains_a_step_and_exports_to_instructblip(dirs, tmp_path):
  root, _, _ = dirs
  model, params = iblip_jax.from_pretrained(str(root / "stage2"), stage1=str(root / "stage1"))
  config = train_helper.train_config()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = train_state.build(model, patterns=config.trainable, optim=config.optim, total_steps=10, mesh=mesh,
                            rules=RULES, max_replicated_bytes=1 << 20)
  trainable, frozen = trainable_lib.split(params, config.trainable)
  before = jax.tree.map(np.asarray, trainable)
  step = setup.train_step(dropout=False)
  with sharding.context(mesh, RULES):
    trainable, _, metrics = step(trainable, setup.init_opt_state(trainable), frozen,
                                 sharding.global_batch(train_helper.make_batch(4), mesh), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  moved = np.asarray(trainable["qformer"]["word_embeddings"]["embedding"]) - before["qformer"]["word_embeddings"][
      "embedding"]
  assert np.abs(moved).max() > 0   # the stage-1 text side is trained
  trained = trainable_lib.merge(trainable, frozen)
  iblip_jax.save_pretrained(model, trained, str(tmp_path / "export"))
  hf, info = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  hf = hf.eval()
  hf.set_attn_implementation("eager")
  batch = oracle.tiny_batch()
  ours = model.apply({"params": trained}, *(jnp.asarray(batch[k]) for k in (
      "pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")),
      decoder_input_ids=jnp.asarray(batch["decoder_input_ids"]),
      decoder_attention_mask=jnp.asarray(batch["decoder_attention_mask"]))
  np.testing.assert_allclose(np.asarray(ours), _t(oracle.hf_forward(hf, batch).logits), atol=5e-5)


def test_without_stage1_the_fallback_is_documented_and_warned(dirs, caplog):
  root, two, _ = dirs
  caplog.set_level(logging.WARNING, logger="iblip_jax")
  overrides = {"qformer": {"vocab_size": 99, "max_position_embeddings": 64}}
  model, params = iblip_jax.from_pretrained(str(root / "stage2"), overrides=overrides)
  assert "no BLIP-2 stage-1 checkpoint" in caplog.text and "blip2-itm-vit-g" in caplog.text
  assert model.config.qformer.max_position_embeddings == 64   # the text sizes come from config.model
  s2 = two.state_dict()
  text = _text_side_leaves(params)
  for i in range(3):   # the text feed-forward starts as the query one
    np.testing.assert_array_equal(text[f"qformer.encoder.layer.{i}.intermediate.dense.weight"],
                                  _t(s2[f"qformer.encoder.layer.{i}.intermediate_query.dense.weight"]))
    np.testing.assert_array_equal(text[f"qformer.encoder.layer.{i}.output.LayerNorm.weight"],
                                  _t(s2[f"qformer.encoder.layer.{i}.output_query.LayerNorm.weight"]))
  words = text["qformer.embeddings.word_embeddings.weight"]
  assert words.shape == (99, 32) and not words[0].any()   # BERT's init: N(0, 0.02), the padding row zero
  assert abs(words[1:].std() - hf_blip2.FALLBACK_INIT_STD) < 0.003
  _, again = iblip_jax.from_pretrained(str(root / "stage2"), overrides=overrides)   # the same on every process
  np.testing.assert_array_equal(np.asarray(again["qformer"]["word_embeddings"]["embedding"]), words)


def test_wrong_combinations_name_the_file_and_the_fix(dirs, tmp_path):
  root, _, _ = dirs
  with pytest.raises(CheckpointError, match=r"has no language model; pass it as the stage-1 checkpoint \(stage1=, config.model_init_stage1\)"):
    hf.load_config(str(root / "stage1"))
  with pytest.raises(CheckpointError, match="must be a BLIP-2 stage-1 checkpoint"):
    hf.load_config(str(root / "stage2"), stage1=str(root / "stage2"))
  oracle.tiny_hf_model().save_pretrained(tmp_path / "instructblip")
  with pytest.raises(CheckpointError, match="applies only to a BLIP-2 stage-2 directory"):
    hf.load_config(str(tmp_path / "instructblip"), stage1=str(root / "stage1"))
  stage1_model(intermediate_size=40).save_pretrained(tmp_path / "other_stage1")
  with pytest.raises(CheckpointError,
                     match=r"qformer_config.intermediate_size = 40 but the stage-2 checkpoint's Q-Former has 37"):
    hf.load_config(str(root / "stage2"), stage1=str(tmp_path / "other_stage1"))
  with pytest.raises(CheckpointError, match=r"model.qformer.vocab_size=30523 but .*BLIP-2.* says 99"):
    hf.load_config(str(root / "stage2"), stage1=str(root / "stage1"),
                   overrides={"qformer": {"vocab_size": 30523}})


def test_the_main_job_settings_take_a_blip2_start(dirs):
  """config.model_init (stage 2) + config.model_init_stage1 resolve into the model config, and the job's loader
  (run/common.py, what train/eval/export use) takes the text side from stage 1."""
  from iblip_jax.run import common, settings
  root, _, one = dirs
  config = train_helper.load_config("tiny")
  config.model_init, config.model_init_stage1 = str(root / "stage2"), str(root / "stage1")
  config.mesh.fsdp = 1
  s = settings.resolve(config, None, "summary")
  assert s.model_init_stage1 == str(root / "stage1") and s.model.qformer.vocab_size == 99
  model = iblip_jax.InstructBlip(s.model)
  params = common.load_params(s, model, common.setup(s, model, sharding.make_mesh(
      {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])))
  np.testing.assert_array_equal(np.asarray(params["qformer"]["position_embeddings"]["embedding"]),
                                _t(one.state_dict()["embeddings.position_embeddings.weight"]))
  # a BLIP-2 directory has the LLM's tokenizer only: training names the directory that has both
  with pytest.raises(settings.ConfigError, match="has no qformer_tokenizer/ .a BLIP-2 directory"):
    settings.resolve(config, str(root / "w"), "eval")
  config.model_init = ""
  with pytest.raises(settings.ConfigError, match="model_init_stage1=.* but config.model_init is empty"):
    settings.resolve(config, None, "summary")
