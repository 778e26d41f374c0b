"""LAVIS's caption / question cleaning (data/text.py): hand-worked examples of blip_processors.py's rules, and where
the main job applies it."""
import numpy as np

from iblip_jax.data import sources, text


def test_pre_caption_spaces_punctuation_and_lowercases():
  assert text.pre_caption("A Man (left) rides a horse.  Near: the BEACH!") == "a man left rides a horse near the beach"
  assert text.pre_caption('  "Quoted"\n') == "quoted"
  # what stays: ? , ' -
  assert text.pre_caption("What's on the T-shirt, dear?") == "what's on the t-shirt, dear?"
  assert text.pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))


def test_pre_question_deletes_punctuation():
  # deleted, not spaced: "U.S.A." -> "usa", "(left)" -> "left"
  assert text.pre_question("Is the U.S.A. flag (left) red?") == "is the usa flag left red?"
  assert text.pre_question("What: is it;  ") == "what is it"
  assert text.pre_question(" ".join(["why"] * 55)) == " ".join(["why"] * 50)


def test_training_cleans_captions_and_questions_not_answers():
  render = sources.renderer("raw", "lavis")
  rng = np.random.default_rng(0)
  assert render({"dataset": "coco_caption", "captions": ["A DOG. On Grass!"]}, rng) == ("", "a dog on grass")
  assert render({"dataset": "vqav2", "question": "What colour is the U.K. bus?", "answers": ["Red."]}, rng) == \
      ("what colour is the uk bus?", "Red.")
  # question generation: the question is the target, cleaned the same way
  assert render({"dataset": "vqg", "question": "Is it Sunny?", "answers": ["Yes"]}, rng) == ("Yes", "is it sunny?")
  # records that carry their texts, and the default, are left as written
  assert render({"dataset": "jsonl", "text_input": "Hi.", "text_output": "There!"}, rng) == ("Hi.", "There!")
  assert sources.renderer("raw")({"dataset": "coco_caption", "captions": ["A DOG."]}, rng) == ("", "A DOG.")


def test_evaluation_cleans_the_question_as_a_caption():
  record = {"id": 1, "question": "Where is the cat (on the left)?", "answers": ["Sofa."]}
  assert text.for_evaluation(record) == {"id": 1, "question": "where is the cat on the left ?", "answers": ["Sofa."]}
  assert text.for_evaluation({"id": 2, "captions": ["A B."]}) == {"id": 2, "captions": ["A B."]}
