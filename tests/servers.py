"""Servers the tests start as a user does (`python -m iblip_jax.serve ...`): a free port, the process started and
waited on until it listens, the demo's kind of image."""
import os
import socket
import subprocess
import sys
import time

import numpy as np

from iblip_jax.demo import shapes

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "demo_assets", "instructblip-demo")


def demo_image(path) -> str:
  shapes.draw("square", "blue", "yellow", np.random.default_rng(0)).resize((96, 96)).save(path)
  return str(path)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def external_address() -> str | None:
  """An address of this machine other than loopback, if it has one."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
      s.connect(("10.255.255.255", 1))   # no packet is sent: this only picks the outgoing interface
      address = s.getsockname()[0]
    except OSError:
      return None
  return None if address.startswith("127.") else address


def start_server(port: int, log_path, *args: str, module: str = "iblip_jax.serve") -> subprocess.Popen:
  """`python -m <module> --port <port> [args]`, its output in log_path, once it listens on 127.0.0.1:port."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "GRADIO_ANALYTICS_ENABLED": "False",
         "PYTHONUNBUFFERED": "1"}
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
    try:
      with socket.create_connection(("127.0.0.1", port), timeout=1):
        return proc
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise AssertionError(f"the server did not listen within 240 s:\n{open(log_path).read()[-3000:]}")
