"""The paper's reported numbers, to set a run beside them: Dai et al., "InstructBLIP: Towards General-purpose
Vision-Language Models with Instruction Tuning", NeurIPS 2023 (arXiv 2305.06500).

Copied from the team's transcription of the paper's tables (shared/reference/paper_results.md): Table 1 (zero-shot
on the 13 held-out datasets), Table 2 (ablations) and Table 3 (fine-tuning on downstream tasks). Metrics as the
paper reports them, in percent: CIDEr for NoCaps and Flickr30K, MRR for Visual Dialog, AUC for Hateful Memes,
accuracy (or VQA accuracy) elsewhere; None where the paper has no number ("-").
"""

# Table 1's columns, in the paper's order, as iblip_jax.evaluation.tasks names them.
TABLE1_TASKS = ("nocaps", "flickr30k", "gqa", "vsr", "iconqa", "textvqa", "visdial", "hateful_memes", "vizwiz",
                "scienceqa_img", "msvd_qa", "msrvtt_qa", "ivqa")
TITLES = {"nocaps": "NoCaps", "flickr30k": "Flickr30K", "gqa": "GQA", "vsr": "VSR", "iconqa": "IconQA",
          "textvqa": "TextVQA", "visdial": "Visdial", "hateful_memes": "HM", "vizwiz": "VizWiz",
          "scienceqa_img": "SciQA img", "msvd_qa": "MSVD QA", "msrvtt_qa": "MSRVTT QA", "ivqa": "iVQA"}
# Task-table variants that stand for a Table 1 column (the same dataset and metric, other ranking words).
VARIANT_OF = {"hateful_memes_verbalizers": "hateful_memes", "vsr_verbalizers": "vsr"}

# The paper's language models, by the names configs use (config.paper_model).
MODELS = {"flant5xl": "FlanT5-XL", "flant5xxl": "FlanT5-XXL", "vicuna7b": "Vicuna-7B", "vicuna13b": "Vicuna-13B"}

_ = None
TABLE1 = {   # row -> one value per TABLE1_TASKS column
    "Flamingo-3B": (_, 60.6, _, _, _, 30.1, _, 53.7, 28.9, _, 27.5, 11.0, 32.7),
    "Flamingo-9B": (_, 61.5, _, _, _, 31.8, _, 57.0, 28.8, _, 30.2, 13.7, 35.2),
    "Flamingo-80B": (_, 67.2, _, _, _, 35.0, _, 46.4, 31.6, _, 35.6, 17.4, 40.7),
    "BLIP-2 (FlanT5-XL)": (104.5, 76.1, 44.0, 60.5, 45.5, 43.1, 45.7, 53.0, 29.8, 54.9, 33.7, 16.2, 40.4),
    "BLIP-2 (FlanT5-XXL)": (98.4, 73.7, 44.6, 68.2, 45.4, 44.1, 46.9, 52.0, 29.4, 64.5, 34.4, 17.4, 45.8),
    "BLIP-2 (Vicuna-7B)": (107.5, 74.9, 38.6, 50.0, 39.7, 40.1, 44.9, 50.6, 25.3, 53.8, 18.3, 9.2, 27.5),
    "BLIP-2 (Vicuna-13B)": (103.9, 71.6, 41.0, 50.9, 40.6, 42.5, 45.1, 53.7, 19.6, 61.0, 20.3, 10.3, 23.5),
    "InstructBLIP (FlanT5-XL)": (119.9, 84.5, 48.4, 64.8, 50.0, 46.6, 46.6, 56.6, 32.7, 70.4, 43.4, 25.0, 53.1),
    "InstructBLIP (FlanT5-XXL)": (120.0, 83.5, 47.9, 65.6, 51.2, 46.6, 48.5, 54.1, 30.9, 70.6, 44.3, 25.6, 53.8),
    "InstructBLIP (Vicuna-7B)": (123.1, 82.4, 49.2, 54.3, 43.1, 50.1, 45.2, 59.6, 34.5, 60.5, 41.8, 22.1, 52.2),
    "InstructBLIP (Vicuna-13B)": (121.9, 82.8, 49.5, 52.1, 44.8, 50.7, 45.4, 57.5, 33.4, 63.1, 41.2, 24.8, 51.0),
}

# Table 2: the ablations (held-in average and five held-out datasets).
TABLE2_COLUMNS = ("held_in_avg", "gqa", "scienceqa_img", "iconqa", "vizwiz", "ivqa")
TABLE2 = {
    "InstructBLIP (FlanT5-XL)": (94.1, 48.4, 70.4, 50.0, 32.7, 53.1),
    "FlanT5-XL w/o instruction-aware visual features": (89.8, 45.9, 63.4, 45.8, 25.1, 47.5),
    "FlanT5-XL w/o data balancing": (92.6, 46.8, 66.0, 49.9, 31.8, 51.1),
    "InstructBLIP (Vicuna-7B)": (100.8, 49.2, 60.5, 43.1, 34.5, 52.2),
    "Vicuna-7B w/o instruction-aware visual features": (98.9, 48.2, 55.2, 41.2, 32.4, 36.8),
    "Vicuna-7B w/o data balancing": (98.8, 47.8, 59.4, 43.5, 32.3, 50.3),
}

# Table 3: fine-tuning on downstream tasks (InstructBLIP or BLIP-2 as the initialisation).
TABLE3_COLUMNS = ("scienceqa_img", "ocrvqa", "okvqa", "aokvqa_direct_val", "aokvqa_direct_test", "aokvqa_mc_val",
                  "aokvqa_mc_test")
TABLE3 = {
    "previous SOTA": (89.0, 70.3, 66.1, 56.3, 61.6, 73.2, 73.6),
    "BLIP-2 (FlanT5-XXL)": (89.5, 72.7, 54.7, 57.6, 53.7, 80.2, 76.2),
    "InstructBLIP (FlanT5-XXL)": (90.7, 73.3, 55.5, 57.1, 54.8, 81.0, 76.7),
    "BLIP-2 (Vicuna-7B)": (77.3, 69.1, 59.3, 60.0, 58.7, 72.1, 69.0),
    "InstructBLIP (Vicuna-7B)": (79.5, 72.8, 62.1, 64.0, 62.1, 75.7, 73.4),
}


def table1_row(row: str) -> dict[str, float | None]:
  """{task: value} of one Table 1 row."""
  if row not in TABLE1:
    raise KeyError(f"no Table 1 row {row!r}; rows: {', '.join(TABLE1)}")
  return dict(zip(TABLE1_TASKS, TABLE1[row]))


def model_rows(model: str) -> tuple[str, str]:
  """(InstructBLIP row, BLIP-2 row) of Table 1 for a config's paper_model ("flant5xl", ...)."""
  if model not in MODELS:
    raise KeyError(f"paper_model={model!r}; expected one of {', '.join(MODELS)}")
  return f"InstructBLIP ({MODELS[model]})", f"BLIP-2 ({MODELS[model]})"
