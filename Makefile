# `make test` is the path CI takes (.ci/run) and the path a new user takes: same venv, same install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast test-browser chromium demo serve install clean

# lmms-eval (the `lmms` extra) for its test, without the dependencies its package lists: they include its own torch
# (a multi-GB CUDA build, replacing the pinned CPU one), PyAV < 16 and dozens of task packages. These are what its
# command line, its task loading and the generation / log-likelihood paths import (filelock < 4: its evaluator
# patches filelock 3's internals).
LMMS_EVAL := lmms-eval==0.7.3 loguru==0.7.3 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 \
	lxml==6.2.0 evaluate==0.4.6 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 xxhash==4.1.0 tenacity==9.2.1 \
	'filelock<4' pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
	tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(LMMS_EVAL)
	touch $(STAMP)

install: $(STAMP)

# --dist loadgroup: tests that share an expensive session fixture (@pytest.mark.xdist_group) run on one worker.
# --durations: the slowest tests in CI's log, where the suite's time goes.
# --max-worker-restart=0: a worker that crashes (a segfault) fails the run at once; replacing it left pytest-xdist
# 3.8 waiting forever under loadgroup (pytest-dev/pytest-xdist#1323), which CI would only end at its time limit.
XDIST := -n 2 --dist loadgroup --max-worker-restart=0
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25 tests

# The inner loop: everything but the tests marked slow or integration (those launch the main job or take long).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not integration" tests

# The main job on the embedded demo: procedural data generated here, tiny pretrained towers from demo_assets/.
demo: $(STAMP)
	$(PY) -m iblip_jax.demo.shapes runs/demo/data
	$(PY) -m iblip_jax.main --config configs/demo.py --workdir runs/demo

# The local web demo (gradio) at http://127.0.0.1:7860: the demo `make demo` trained (runs/demo), or before that the
# demo checkpoint; MODEL=DIR serves a Hugging Face InstructBLIP directory or a training workdir instead.
serve: $(STAMP)
	$(PY) -m iblip_jax.serve $(if $(MODEL),--model $(MODEL))

# The web demo driven by a headless Chromium (Debian's chromium and chromium-driver, installed here if missing; the
# browser test skips without them), on the demo it trains first. The screenshots go to runs/test-artifacts/.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test-browser: $(STAMP) chromium
	$(PY) -m pytest -q -p no:xdist tests/test_serve_browser.py

clean:
	rm -rf $(VENV) .pytest_cache
