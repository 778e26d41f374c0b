# `make test` is the path CI takes (.ci/run) and the path a new user takes: same venv, same install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The inner loop: everything but the tests marked slow or integration (those launch the main job or take long).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow and not integration" tests

# The main job on the embedded demo: procedural data generated here, tiny pretrained towers from demo_assets/.
demo: $(STAMP)
	$(PY) -m iblip_jax.demo.shapes runs/demo/data
	$(PY) -m iblip_jax.main --config configs/demo.py --workdir runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
