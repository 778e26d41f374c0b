# `make test` is the path CI takes (.ci/run) and the path a new user takes: same venv, same install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast test-browser chromium demo serve install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# --dist loadgroup: tests that share an expensive session fixture (@pytest.mark.xdist_group) run on one worker.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# The inner loop: everything but the tests marked slow or integration (those launch the main job or take long).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not integration" tests

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
