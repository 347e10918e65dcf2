# Two entry points (see README): `make demo` runs the main job, `make test` runs the checks.
# Both create or reuse the virtual environment in $(VENV). An already installed torch is kept;
# otherwise `pip install torch==$(TORCH_VERSION)` runs; which wheel (CPU or CUDA) it gets depends
# on the pip configuration (docs/installation.md: the CPU wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.sbnn-installed

.PHONY: install demo test lint docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-deps "spikingjelly==2.0.0"
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sbnn-bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The second pytest run turns the C kernel off: the host-model, reference-network and
# bad-input tests then take the PyTorch path, the one CUDA tensors take.
PYTORCH_PATH_TESTS := tests/test_bad_input.py tests/test_snntorch_convert.py \
	tests/test_snntorch_host_utils.py tests/test_spikingjelly_equivalence.py \
	tests/test_spikingjelly_host_utils.py tests/test_dropin_defaults.py \
	tests/test_readout_noise.py tests/test_models.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist worksteal
	SBNN_ADDONS_KERNELS=0 $(PY) -m pytest -q -n 2 --dist worksteal $(PYTORCH_PATH_TESTS)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site .pytest_cache
