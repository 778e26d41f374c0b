"""The terminal: `python -m iblip_jax.inference --model DIR --image photo.jpg ["What is it?"] [--chat]`.

The answer goes to stdout as it is produced (greedy decoding streams; --num-beams > 1 is beam search, the Python
API's default, printed when it is complete); everything else (notes, the attention overlay's path, errors) goes to
stderr, so `... > answer.txt` keeps the answer alone. Exit status: 0 answered, 1 a problem with the model or the
image (the message says which), 2 a command-line mistake (an empty prompt included).
"""
import argparse
import logging
import sys

from iblip_jax import distributed
from iblip_jax.errors import UserError
from iblip_jax.inference.pipeline import Pipeline

DEFAULT_PROMPT = "A short image description:"


def _args(argv):
  p = argparse.ArgumentParser(
      prog="python -m iblip_jax.inference", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description="Answer an instruction about an image, streaming the answer; --chat then reads follow-up "
                  "questions. Decoding is greedy here so that the answer can stream (the Python API's default is "
                  "LAVIS's beam search with 5 beams: --num-beams 5).")
  p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the instruction or question")
  p.add_argument("--model", required=True, help="a Hugging Face InstructBLIP directory or a training workdir")
  p.add_argument("--image", required=True)
  p.add_argument("--dtype", default=None, help="frozen towers' dtype (float32, bfloat16); default float32")
  p.add_argument("--chat", action="store_true", help="keep asking follow-up questions (an empty line ends)")
  p.add_argument("--num-beams", type=int, default=1, help="1: greedy, streamed; more: beam search, no streaming")
  p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=50)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=30)
  p.add_argument("--repetition-penalty", type=float, default=1.5)
  p.add_argument("--attention-maps", default="", help="also write the attention overlay PNG here")
  args = p.parse_args(argv)
  if not args.prompt.strip():
    p.error("the prompt is empty: type an instruction or a question about the image")
  return args


def _answer(chat, question: str, streamed: bool) -> None:
  if streamed:
    for chunk in chat.stream(question):
      print(chunk.delta, end="", flush=True)
    print(flush=True)
  else:
    print(chat.ask(question), flush=True)


def main(argv=None) -> int:
  args = _args(argv)
  distributed.default_platform()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
  settings = dict(do_sample=args.sample, num_beams=args.num_beams, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                  repetition_penalty=args.repetition_penalty)
  try:
    pipe = Pipeline.from_pretrained(args.model, args.dtype)
    chat = pipe.chat(args.image, **settings)
    question = args.prompt
    while question:
      _answer(chat, question, streamed=args.num_beams == 1)
      if args.attention_maps:
        pipe.attention_overlay(chat.image, [question], [chat.turns[-1]], path=args.attention_maps)
        print(f"(attention overlay: {args.attention_maps})", file=sys.stderr)
      if not args.chat:
        break
      try:
        question = input("> ").strip()
      except EOFError:
        break
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
