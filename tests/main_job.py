"""Launching the main job as a user does (`python -m iblip_jax.main --config configs/demo.py ...`), for the tests
that do: the assets they launch on, the command line, the environment, and reading what a run left behind.

Every launch inherits JAX's persistent compilation cache from the test session (conftest.py sets
JAX_COMPILATION_CACHE_DIR), so a program compiled by one launch is read back by the next instead of compiled again.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

import oracle
from iblip_jax.demo import shapes, word_tokenizers

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def assets(root):
  """A tiny InstructBLIP checkpoint (separate LM head) with the demo's word tokenizers in root/ckpt, and the shapes
  data in root/data (48 training, 6 validation images), plus long.jsonl (instructions of 20+ words, so that hosts'
  shares of a batch pad to different widths) and pairs.jsonl (predict's (image, prompt) lines)."""
  oracle.tiny_hf_model(untie_head=True, tie=False).save_pretrained(root / "ckpt")
  word_tokenizers.build(shapes.vocabulary(), str(root / "ckpt"))
  shapes.generate(str(root / "data"), train=48, val=6, seed=0)
  words = [w for w in shapes.vocabulary() if w.isalpha()][:30]
  with open(root / "data" / "long.jsonl", "w") as f:
    for i in range(24):
      text = " ".join(words[(i + j) % len(words)] for j in range(20 + i % 5))
      f.write(json.dumps({"image": f"images/train_{i:05d}.png", "text_input": text, "text_output": words[i % 7]})
              + "\n")
  pairs = [{"image": f"images/val_{i:05d}.png", "prompt": p}
           for i, p in enumerate(["A short image caption:", "Question: What color is the shape? Short answer:"] * 3)]
  (root / "data" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  return root


def flags(assets_root, workdir, **overrides) -> list[str]:
  """The command line of a short demo-config job on the assets: 6 steps at batch 8, a checkpoint every 2."""
  data = assets_root / "data"
  settings = {
      "model_init": str(assets_root / "ckpt"), "total_steps": 6, "batch_size": 8, "checkpoint_every": 2,
      "log_every": 1, "eval_at_start": False, "eval_at_end": False, "eval_every": 1000, "eval_batch_size": 3,
      "data.datasets.caption.path": str(data / "caption.jsonl"), "data.datasets.vqa.path": str(data / "vqa.jsonl"),
      "data.datasets.qgen.path": str(data / "qgen.jsonl"),
      "evals.held_in_vqa.path": str(data / "val_vqa.jsonl"),
      "evals.held_out_mc.path": str(data / "val_mc.jsonl"), "mesh.data": 1, "mesh.fsdp": 1,
      "mesh.tensor": 1, "optim.lr": 1e-3, "optim.warmup_steps": 1, "dropout": True,
      "log_mfu": False,   # counting a step's FLOPs compiles it again, in the background; one test turns it on
      **overrides}
  return ["--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(workdir)] + [
      f"--config.{k}={v}" for k, v in settings.items()]


def env(devices: int = 1, **extra) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": xla_flags(devices), **extra}


def xla_flags(devices: int) -> str:
  """`devices` CPU devices, compiled at LLVM -O0 like the in-process tests (conftest.py's FAST_COMPILE)."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


def launch(args, devices: int = 1, **popen) -> subprocess.Popen:
  """The job started in the background (stdout and stderr discarded unless `popen` says otherwise)."""
  popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
  return subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=env(devices), **popen)


def run(args, devices: int = 1, check: bool = True, cwd=ROOT, timeout: int = 900, **extra_env):
  out = subprocess.run([sys.executable, "-m", "iblip_jax.main", *args], cwd=cwd, env=env(devices, **extra_env),
                       capture_output=True, text=True, timeout=timeout)
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_hosts(args, processes: int, devices: int, logdir, tag: str) -> list[subprocess.Popen]:
  """The job as `processes` processes of `devices` CPU devices each, as a pod runs it (the environment
  tools/tpu/worker.sh exports on a multi-host slice); process i logs to logdir/<tag>_<i>.log."""
  port = _free_port()
  procs = []
  for i in range(processes):
    extra = {}
    if processes > 1:
      extra = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
    log = open(logdir / f"{tag}_{i}.log", "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "iblip_jax.main", *args], cwd=ROOT, env=env(devices, **extra),
                                  stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait_hosts(procs, logdir, tag: str, timeout: int = 600) -> str:
  """Waits for every process (killing all and failing after `timeout`: hosts that disagree hang), checks they all
  exited 0, and returns process 0's log."""
  import pytest
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{tag} hung for {timeout} s:\n" + host_logs(logdir, tag, len(procs)))
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), f"{tag} exited {codes}:\n" + host_logs(logdir, tag, len(procs))
  return (logdir / f"{tag}_0.log").read_text()


def host_logs(logdir, tag: str, n: int) -> str:
  return "\n".join(f"--- process {i}\n" + (logdir / f"{tag}_{i}.log").read_text()[-3000:] for i in range(n))


def wait_for(path, proc, timeout: int = 600) -> None:
  """Until `path` exists (the job got that far), or the job ended, or `timeout` passed (then fail)."""
  deadline = time.time() + timeout
  while not path.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


def trainable_at(workdir, step):
  """The trainable tree of a checkpoint, read back with orbax."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["trainable"]


def leaves(tree) -> list[np.ndarray]:
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
