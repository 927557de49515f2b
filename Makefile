# The two commands of the README's quick start. Each creates .venv/ when missing and
# installs the project into it (torch==2.13.0 is the CPU build).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= a handwritten digit 7
# FID's network for benchmarks/sd_quality.py. --no-deps: torch-fidelity requires torchvision,
# and PyPI's torchvision is a CUDA build that fails to load beside the CPU torch (then breaks
# transformers' imports); sd_quality.py imports only torch-fidelity's torch-only InceptionV3.
TORCH_FIDELITY := torch-fidelity==0.4.0

.PHONY: demo test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(TORCH_FIDELITY)
	touch $(STAMP)

## demo: export the embedded tiny-sd model and generate a PNG with OpenVINO
demo: $(STAMP)
	$(VENV)/bin/dq-export --model tiny-sd --bits fp32 --out exports/tiny-sd-fp32 --force
	$(VENV)/bin/dq-generate exports/tiny-sd-fp32 --prompt "$(PROMPT)" --steps 50 --out outputs/tiny-sd.png

## test: the offline test suite (full-size checks: make test PYTEST_ARGS=--run-slow)
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
