# osteo: every target installs what it needs first, so a fresh clone needs no step before.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OSTEO := $(VENV)/bin/osteo
STAMP := $(VENV)/.installed

DATA ?= data/phantom
MODEL ?= convnext_tiny
RECIPE ?= $(MODEL)
OUT ?= reports

.PHONY: install test test-all lint data audit train train-all report bench demo clean

install: $(STAMP)

# The CPU build of PyTorch (for the PyTorch-backend test) first: once it is there,
# nothing else pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install
	OSTEO_SLOW=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check osteo tests recipes benchmarks

data: install
	@test -d $(DATA)/normal || $(OSTEO) data phantom $(DATA)

audit: install
	$(OSTEO) data audit $(DATA) --out $(OUT)/audit

clean:
	rm -rf $(VENV) data/phantom runs reports .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Make variables pass through to `osteo train`; DATA only when given (the default is the phantom).
TRAIN_ARGS = --model $(MODEL) \
	$(if $(filter command line environment,$(origin DATA)),--data $(DATA)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(BATCH),--batch $(BATCH)) \
	$(if $(SEED),--seed $(SEED)) $(if $(RESUME),--resume $(RESUME))
STUDY_MODELS := vgg16 vgg19 densenet169 convnext_tiny

train: install
	$(OSTEO) train $(RECIPE) $(TRAIN_ARGS)

train-all: install
	@for m in $(STUDY_MODELS); do $(MAKE) --no-print-directory train MODEL=$$m RECIPE=$$m || exit 1; done
