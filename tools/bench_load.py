"""Loading a real-size checkpoint: the main job's load time, read rate and peak host memory, against a plain read.

  python tools/bench_load.py [--size real|tiny] [--dir DIR] [--keep] [--write-only | --skip-write] [--devices 4]
                             [--mesh fsdp|tensor] [--quantize int8|int4] [--xla-flags FLAGS] [--trace DIR]

1. Writes an InstructBLIP FlanT5-XL checkpoint with random bfloat16 weights through transformers, in the layout of
   the released Salesforce/instructblip-flan-t5-xl: the same tensor names and shapes (language_model.lm_head.weight,
   no encoder/decoder embed_tokens copies), about 8 GB as ~2 GB safetensors shards with model.safetensors.index.json,
   transformers' config.json, small word-level tokenizers (the main job loads them from model_init) and an image.
   The model is built on torch's meta device and each tensor is generated, written and freed in turn, so writing
   holds one shard at most. `--size tiny` writes configs/tiny.py's sizes instead (a few hundred KB; a test runs it).
2. Drops the files from the page cache (fsync, then posix_fadvise DONTNEED: no root needed for clean pages) and
   times a plain sequential read of them: the disk's rate, what a load could reach. It does so again after the job
   (step 3), and the load's rate is judged against the faster of the two: on the benchmark VM the same read took
   6 s or 13 s within minutes.
3. Drops them again and answers one prompt with the main job's predict mode on an emulated CPU mesh, as a user
   would (`python -m iblip_jax.main ... --config.mode=predict --config.model_init=DIR`), in a subprocess, and
   parses its "loaded DIR: ... GB/s" line. The job's peak resident memory is the kernel's high-water mark
   (ru_maxrss of os.wait4 on that one process); psutil samples of its RSS every 0.2 s say when the peak came
   (--trace DIR keeps them, with the job's stderr: the load's progress bar, in rss.tsv and job.log).

Target: peak RSS <= 1.25 x checkpoint + 1.5 GiB (the parameters once, plus runtime). Exit status 3 when missed,
after the full report. The checkpoint directory is deleted at the end unless --keep (or --skip-write: a directory
this run did not write is never deleted). Default directory: /tmp/bench_load (real), a temporary one (tiny).
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

GIB = 2**30
TARGET_FACTOR, TARGET_EXTRA = 1.25, 1.5 * GIB
QUANTIZED_EXTRA = 2 * GIB   # --quantize: peak RSS <= the quantised weights + this
TARGET_MISSED = 3        # exit status: the report is complete, the memory target was missed
LOAD_TARGET = 0.8        # the job's load rate against the plain read's (issue 25); reported, not an exit status
SAMPLE_SECONDS = 0.2
PROMPT = "What is in this image?"
WORDS = "what is in this image ? a photo of the cat dog on table red blue man woman street".split()
LOADED = re.compile(r"^loaded (?P<dir>.+): (?P<tensors>\d+) tensors, (?P<gb>[\d.]+) GB read by this process in "
                    r"(?P<seconds>[\d.]+) s \((?P<rate>[\d.]+) GB/s\)$")

# transformers' InstructBlipConfig arguments. real: the released config.json's sizes; tiny: configs/tiny.py's (the
# main job checks that its config's sizes agree with the checkpoint), with the released untied head.
SIZES = {
    "real": dict(
        job_config="configs/instructblip_flant5xl.py", shard_bytes=2 * 10**9, default_dir="/tmp/bench_load",
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408),
        text_config=dict(model_type="t5", vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32,
                         num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                         tie_word_embeddings=False),
        num_query_tokens=32),
    "tiny": dict(
        # shards far below the checkpoint's size, so that the index and several files are exercised
        job_config="configs/tiny.py", shard_bytes=64 * 1024, default_dir=None,
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=2),
        qformer_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=37, cross_attention_frequency=2, encoder_hidden_size=32),
        text_config=dict(model_type="t5", vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                         num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False),
        num_query_tokens=10),
}
CONFIG_KEYS = ("vision_config", "qformer_config", "text_config", "num_query_tokens")


# --- the checkpoint ---------------------------------------------------------------------------------------------


def hf_config(size: str):
  from transformers import InstructBlipConfig
  return InstructBlipConfig(**{k: SIZES[size][k] for k in CONFIG_KEYS})


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every tensor the released checkpoint holds, in state-dict order, without allocating any.

  transformers 5 always ties T5's lm_head to the shared embedding, so its save_pretrained would drop lm_head; the
  released FlanT5 checkpoints (saved by transformers 4) have their own lm_head. So the head gets its own (meta)
  parameter first, as tests/oracle.py's untie_head does, and transformers' own save-time de-duplication then drops
  exactly the encoder/decoder embed_tokens copies."""
  import torch
  from transformers import InstructBlipForConditionalGeneration
  from transformers.modeling_utils import remove_tied_weights_from_state_dict
  with torch.device("meta"):
    model = InstructBlipForConditionalGeneration(config)
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
  state = remove_tied_weights_from_state_dict(model.state_dict(), model)
  return [(name, tuple(t.shape)) for name, t in state.items()]


def shard_plan(specs, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
  """Consecutive tensors grouped into shards of at most shard_bytes (a larger tensor alone), in order."""
  plan, size = [[]], 0
  for name, shape in specs:
    nbytes = 2 * math.prod(shape)
    if plan[-1] and size + nbytes > shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append((name, shape))
    size += nbytes
  return plan


def random_tensor(name: str, shape, generator):
  """bfloat16 N(0, 0.02); norm scales near 1, so that activations keep their size through 24+24 T5 blocks."""
  import torch
  t = torch.empty(shape, dtype=torch.bfloat16)
  if "norm" in name.lower() and name.endswith(".weight"):
    return t.normal_(1.0, 0.02, generator=generator)
  return t.normal_(0.0, 0.02, generator=generator)


def write_checkpoint(directory: str, size: str) -> list[str]:
  """config.json, the safetensors shards and their index; returns the shard paths."""
  import torch
  from safetensors.torch import save_file
  config = hf_config(size)
  plan = shard_plan(tensor_specs(config), SIZES[size]["shard_bytes"])
  generator = torch.Generator().manual_seed(0)
  os.makedirs(directory, exist_ok=True)
  weight_map, total, paths = {}, 0, []
  for k, shard in enumerate(plan, 1):
    file_name = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
    tensors = {name: random_tensor(name, shape, generator) for name, shape in shard}
    save_file(tensors, os.path.join(directory, file_name), metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update({name: file_name for name in tensors})
    paths.append(os.path.join(directory, file_name))
    del tensors
    print(f"  wrote {file_name}: {len(shard)} tensors", flush=True)
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  config.save_pretrained(directory)
  return paths


def vocabulary(size: str) -> list[str]:
  """The prompt's words and fillers "w0", "w1", ...: as many as both vocabularies hold (word_tokenizers.build adds
  6 Q-Former specials and up to 47 characters, 3 LLM specials), so that most ids a random model generates decode to
  a word and the answer shows that generation reached the tokenizer."""
  from iblip_jax.demo import word_tokenizers
  qformer_room = SIZES[size]["qformer_config"]["vocab_size"] - len(word_tokenizers.QFORMER_SPECIALS) - 47
  llm_room = SIZES[size]["text_config"]["vocab_size"] - len(word_tokenizers.LLM_SPECIALS)
  words = sorted(set(WORDS))
  return words + [f"w{i}" for i in range(min(qformer_room, llm_room) - len(words))]


def write_assets(directory: str, size: str) -> str:
  """Word-level tokenizers (every id below both vocabularies) and a PNG; returns the image's path."""
  import numpy as np
  from PIL import Image
  from iblip_jax.demo import word_tokenizers
  word_tokenizers.build(vocabulary(size), directory)
  image_size = SIZES[size]["vision_config"]["image_size"]
  rng = np.random.default_rng(0)
  path = os.path.join(directory, "image.png")
  Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(path)
  return path


def shard_paths(directory: str) -> list[str]:
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    names = sorted(set(json.load(f)["weight_map"].values()))
  return [os.path.join(directory, n) for n in names]


# --- the page cache and a plain read ----------------------------------------------------------------------------


def drop_from_cache(paths) -> None:
  """Written pages are dirty and DONTNEED skips those: flush them first."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def cached_fraction(paths) -> float | None:
  """The share of the files' bytes in the page cache (the loader's own check, per file), so that the report shows
  the reads were cold; None where libc's mincore is not reachable."""
  from iblip_jax.hf import direct_io
  parts = [(direct_io.cached_fraction(path), os.path.getsize(path)) for path in paths]
  if any(f is None for f, _ in parts):
    return None
  return sum(f * n for f, n in parts) / max(sum(n for _, n in parts), 1)


def sequential_read(paths, chunk: int = 64 * 2**20) -> tuple[int, float]:
  """(bytes, seconds) of reading the files front to back into one reused buffer."""
  buffer = memoryview(bytearray(chunk))
  done = 0
  start = time.perf_counter()
  for path in paths:
    with open(path, "rb", buffering=0) as f:
      while n := f.readinto(buffer):
        done += n
  return done, time.perf_counter() - start


# --- the main job -----------------------------------------------------------------------------------------------


# The two parameter layouts of the README: training's (FSDP: weights split over all devices, each layer gathered as
# it runs) and the one it recommends for predict alone (tensor-parallel: heads, MLP and vocabulary split, nothing
# gathered).
MESHES = {"fsdp": ["--config.mesh.fsdp=-1"], "tensor": ["--config.mesh.fsdp=1", "--config.mesh.tensor=-1"]}


def job_command(size: str, directory: str, image: str, mesh: str = "fsdp", quantize: str = "") -> list[str]:
  return [sys.executable, "-m", "iblip_jax.main", "--config", SIZES[size]["job_config"], "--config.mode=predict",
          f"--config.model_init={directory}", "--config.model.vision.dtype=bfloat16",
          "--config.model.text.dtype=bfloat16", *MESHES[mesh], f"--config.predict.images={image}",
          f"--config.predict.prompt={PROMPT}", "--config.predict.batch_size=4", "--config.predict.num_beams=1",
          "--config.predict.max_new_tokens=3", f"--config.model.vision.quantize={quantize}",
          f"--config.model.text.quantize={quantize}"]


def quantized_bytes(directory: str, quantize: str) -> int:
  """The bytes of the model's parameters as the job holds them: integer kernels and their float32 scales, the rest
  in bfloat16."""
  import jax
  from iblip_jax import hf
  from iblip_jax.models.instructblip import InstructBlip, params_shape
  tower = {"dtype": "bfloat16", "quantize": quantize}
  cfg = hf.load_config(directory, overrides={"vision": tower, "text": tower})
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params_shape(InstructBlip(cfg))))


def run_job(command: list[str], xla_flags: str, log_path: str) -> dict:
  """Runs the job; returns its exit status, stdout lines, wall time, kernel peak RSS and the psutil samples
  [(seconds, rss, phase, stderr)]: phase is "load" until the job prints its "loaded" line, then "answer"; stderr is
  the job's latest stderr line then (the load's progress bar: bytes read so far). `log_path` gets the job's stderr,
  each line with its time."""
  import psutil
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, TOKENIZERS_PARALLELISM="false")
  lines, samples, state = [], [], {"phase": "load", "stderr": ""}
  start = time.perf_counter()
  # text mode turns the progress bar's carriage returns into line ends: one log line per update
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def read_stdout():
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      if LOADED.match(lines[-1]):
        samples.append((time.perf_counter() - start, _rss(psutil, proc.pid), "loaded", state["stderr"]))
        state["phase"] = "answer"

  def read_stderr():
    with open(log_path, "w") as log:
      for line in proc.stderr:
        state["stderr"] = line.strip()
        log.write(f"{time.perf_counter() - start:8.1f}  {line}")

  readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
  for r in readers:
    r.start()
  status = rusage = None
  while status is None:
    pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      status, rusage = wait_status, usage
    else:
      samples.append((time.perf_counter() - start, _rss(psutil, proc.pid), state["phase"], state["stderr"]))
      time.sleep(SAMPLE_SECONDS)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here by wait4: Popen must not wait again
  for r in readers:
    r.join()
  return dict(rc=proc.returncode, lines=lines, wall=wall, peak=rusage.ru_maxrss * 1024,  # Linux: KiB
              samples=[s for s in samples if s[1]])


def write_trace(path: str, samples) -> None:
  """The samples as a table: seconds, RSS in GiB, phase, the job's stderr line at the time."""
  with open(path, "w") as f:
    f.write("seconds\trss_gib\tphase\tstderr\n")
    f.writelines(f"{t:.1f}\t{rss / GIB:.3f}\t{phase}\t{err[:160]}\n" for t, rss, phase, err in samples)


def _rss(psutil, pid: int) -> int | None:
  """None once the process is gone (a zombie shows 0)."""
  try:
    return psutil.Process(pid).memory_info().rss or None
  except psutil.Error:
    return None


# --- the report -------------------------------------------------------------------------------------------------


def gb(n: float) -> str:
  if n < 10**8:  # the tiny checkpoint
    return f"{n / 1e6:.3f} MB"
  return f"{n / 1e9:.2f} GB ({n / GIB:.2f} GiB)"


def phase_peaks(samples) -> dict[str, tuple[float, int]]:
  """{phase: (seconds, rss)} at each phase's highest sample ("loaded": the one sample taken at the load line)."""
  out = {}
  for t, rss, phase, _ in samples:
    if phase not in out or rss > out[phase][1]:
      out[phase] = (t, rss)
  return out


def report(checkpoint: int, plains: list[tuple[int, float]], cached: tuple, job: dict,
           weights: int | None = None) -> bool:
  """Prints the job's numbers; returns whether the memory target was met. `plains`: the plain reads before and
  after the job; the load's rate is judged against the faster (the disk's rate moves by 2x within minutes on the
  benchmark VM). `weights`: the quantised parameters' bytes (--quantize), whose target is those bytes + 2 GiB."""
  for when, (plain_bytes, plain_seconds), cached_before in zip(("before", "after"), plains, (cached[0], cached[2])):
    print(f"plain sequential read {when} the job: {gb(plain_bytes)} in {plain_seconds:.1f} s "
          f"({plain_bytes / 1e9 / plain_seconds:.2f} GB/s), {_percent(cached_before)} of the pages cached before")
  loaded = next((m for m in map(LOADED.match, job["lines"]) if m), None)
  if loaded:
    print(f"job load: {loaded['tensors']} tensors, {loaded['gb']} GB in {loaded['seconds']} s ({loaded['rate']} "
          f"GB/s), {_percent(cached[1])} of the pages cached before")
    fastest = max(n / 1e9 / s for n, s in plains)
    share = float(loaded["rate"]) / fastest
    print(f"load rate: {share:.0%} of the faster plain read ({fastest:.2f} GB/s); target >= {LOAD_TARGET:.0%}: "
          f"{'met' if share >= LOAD_TARGET else 'missed'}")
  else:
    print("job load: no 'loaded' line in the job's output")
  print(f"answer: {job['lines'][-1] if job['rc'] == 0 and job['lines'] else None!r} ({_status(job['rc'])})")
  print(f"job wall time: {job['wall']:.1f} s")
  peaks = phase_peaks(job["samples"])
  for phase, what in (("load", "start-up and load"), ("loaded", "at the load line"),
                      ("answer", "compile and answer")):
    if phase in peaks:
      print(f"  RSS {what}: {gb(peaks[phase][1])} (sampled, highest at {peaks[phase][0]:.1f} s)")
  if weights is not None:
    target = weights + QUANTIZED_EXTRA
    met = job["peak"] <= target
    print(f"peak RSS (ru_maxrss of the job): {gb(job['peak'])} = {job['peak'] / checkpoint:.2f} x the bf16 checkpoint; "
          f"target <= the quantised weights {gb(weights)} + {QUANTIZED_EXTRA / GIB:.0f} GiB = {gb(target)}: "
          f"{'met' if met else 'MISSED'}")
    return met
  target = TARGET_FACTOR * checkpoint + TARGET_EXTRA
  met = job["peak"] <= target
  print(f"peak RSS (ru_maxrss of the job): {gb(job['peak'])} = {job['peak'] / checkpoint:.2f} x checkpoint; target "
        f"<= {TARGET_FACTOR} x checkpoint + {TARGET_EXTRA / GIB} GiB = {gb(target)}: {'met' if met else 'MISSED'}")
  return met


def _status(rc: int) -> str:
  if rc >= 0:
    return f"exit status {rc}"
  name = signal.Signals(-rc).name
  # the kernel's OOM killer ends a process with SIGKILL: then the peak is where it was stopped, not what it needed
  return f"killed by {name}" + (": out of memory? (dmesg says)" if name == "SIGKILL" else "")


def _percent(x: float | None) -> str:
  return "unknown share" if x is None else f"{100 * x:.0f}%"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="real")
  parser.add_argument("--dir", help="checkpoint directory (default: /tmp/bench_load, or a temporary one for tiny)")
  parser.add_argument("--keep", action="store_true", help="do not delete the checkpoint directory at the end")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--write-only", action="store_true", help="write the checkpoint and stop (implies --keep)")
  group.add_argument("--skip-write", action="store_true", help="use the checkpoint already in --dir")
  parser.add_argument("--devices", type=int, default=4, help="emulated CPU devices of the job's mesh")
  parser.add_argument("--mesh", choices=sorted(MESHES), default="fsdp",
                      help="the parameter layout: fsdp (training's) or tensor (tensor-parallel decoding)")
  parser.add_argument("--xla-flags", default="", help="more XLA_FLAGS for the job (after the device count)")
  parser.add_argument("--quantize", choices=("int8", "int4"), help="the job's ViT and LLM quantised as they load "
                      "(issue 21's target: peak RSS <= the quantised weights + 2 GiB, and <= 0.6x the bf16 job's)")
  parser.add_argument("--trace", help="a directory for the job's RSS samples (rss.tsv) and stderr (job.log)")
  args = parser.parse_args()
  size = SIZES[args.size]
  directory = args.dir or size["default_dir"] or tempfile.mkdtemp(prefix="bench_load_")
  if not args.skip_write and os.path.isdir(directory) and os.listdir(directory):
    # the directory is deleted at the end: never one that holds something this run did not write
    sys.exit(f"{directory} exists and is not empty: remove it, or pass --skip-write to use the checkpoint there")
  delete = not (args.keep or args.write_only or args.skip_write)
  try:
    return _run(args, directory)
  finally:
    if delete:
      shutil.rmtree(directory, ignore_errors=True)


def _run(args, directory: str) -> int:
  import jax
  import psutil
  import torch
  import transformers
  print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.1f} GiB memory, load average "
        f"{os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}, jax {jax.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}", flush=True)
  image = os.path.join(directory, "image.png")
  if args.skip_write:
    if not os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
      sys.exit(f"--skip-write: no checkpoint in {directory}")
  else:
    start = time.perf_counter()
    write_checkpoint(directory, args.size)
    write_assets(directory, args.size)
    print(f"wrote {directory} in {time.perf_counter() - start:.1f} s", flush=True)
  paths = shard_paths(directory)
  checkpoint = sum(os.path.getsize(p) for p in paths)
  print(f"checkpoint: {gb(checkpoint)} in {len(paths)} safetensors files", flush=True)
  if args.write_only:
    return 0
  drop_from_cache(paths)
  cached_plain = cached_fraction(paths)
  plains = [sequential_read(paths)]
  drop_from_cache(paths)
  cached_job = cached_fraction(paths)
  command = job_command(args.size, directory, image, args.mesh, args.quantize or "")
  xla_flags = f"--xla_force_host_platform_device_count={args.devices} {args.xla_flags}".strip()
  print(f"job: XLA_FLAGS={_quote(xla_flags)} JAX_PLATFORMS=cpu python " + " ".join(_quote(c) for c in command[1:]),
        flush=True)
  if args.trace:
    os.makedirs(args.trace, exist_ok=True)
  log = os.path.join(args.trace or tempfile.gettempdir(), "job.log" if args.trace else f"bench_load_{os.getpid()}.log")
  job = run_job(command, xla_flags, log)
  if args.trace:
    write_trace(os.path.join(args.trace, "rss.tsv"), job["samples"])
  drop_from_cache(paths)
  cached_after = cached_fraction(paths)
  plains.append(sequential_read(paths))
  weights = quantized_bytes(directory, args.quantize) if args.quantize else None
  met = report(checkpoint, plains, (cached_plain, cached_job, cached_after), job, weights)
  if job["rc"] != 0:
    with open(log) as f:
      tail = f.read().splitlines()[-30:]
    print(f"the job failed; the end of its stderr ({log}):\n" + "\n".join(tail), file=sys.stderr)
    return 1
  if not args.trace:
    os.remove(log)
  return 0 if met else TARGET_MISSED


def _quote(arg: str) -> str:
  return f'"{arg}"' if " " in arg else arg


if __name__ == "__main__":
  sys.exit(main())
