# `make demo` and `make test` each set up .venv on a fresh machine, then run.
# torch is pinned to the CPU build first: a bare `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine, install torch and `.[compress,gpu,dev]` yourself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: setup test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[compress,cpu,dev]"
	touch $@

setup: $(VENV)/.installed

# Two pytest workers (pytest-xdist), one test module each at a time (--dist loadscope: a
# module's fixtures, such as the AOTInductor compile, are built once). Most tests run tiny
# models on one or two torch threads, so on a 2-core machine two workers take ~10 min
# where one took ~16 (docs/BENCHMARKS.md, "The test suite on 2 cores").
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

# The demo model is toy:shapes, trained by the project and shipped in the package: the
# bench table has its prompt accuracy, and the image really shows the prompt.
demo: setup
	$(VENV)/bin/slimdiff bench toy-shapes toy-shapes-fp16 --out $(DEMO_OUT)
	$(VENV)/bin/slimdiff run $(DEMO_OUT)/recipes/toy-shapes/bundle \
		--prompt "a green triangle at the top" --steps 20 --out $(DEMO_OUT)/image.png

lint: setup
	$(VENV)/bin/ruff check slimdiff compress export runtime tests tools
	$(VENV)/bin/ruff format --check slimdiff compress export runtime tests tools

clean:
	rm -rf $(DEMO_OUT) build dist *.egg-info
