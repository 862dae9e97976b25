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

.PHONY: install test test-all lint data audit train cv train-all report bench demo study clean export eval

install: $(STAMP)

# The CPU build of PyTorch (for the PyTorch-backend test) first: once it is there,
# nothing else pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,study]"
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
	rm -rf $(VENV) $(BENCH_VENV) data/phantom data/phantom-demo runs reports .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Make variables pass through to `osteo train`; DATA only when given (the default is the phantom).
TRAIN_ARGS = --model $(MODEL) \
	$(if $(filter command line environment,$(origin DATA)),--data $(DATA)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(BATCH),--batch $(BATCH)) \
	$(if $(SEED),--seed $(SEED)) $(if $(RESUME),--resume $(RESUME)) \
	$(if $(filter command line environment,$(origin RUNS)),--runs $(RUNS))
STUDY_MODELS := vgg16 vgg19 densenet169 convnext_tiny

train: install
	$(OSTEO) train $(RECIPE) $(TRAIN_ARGS)

# k-fold cross-validation of one backbone: FOLDS runs under one parent (runs/<model>/<id>/cv.json)
FOLDS ?= 5
cv: install
	$(OSTEO) train $(RECIPE) $(TRAIN_ARGS) --folds $(FOLDS)

train-all: install
	@for m in $(STUDY_MODELS); do $(MAKE) --no-print-directory train MODEL=$$m RECIPE=$$m || exit 1; done

# The comparison across runs: latest run of each model under RUNS (ALL=1: every run).
RUNS ?= runs
report: install
	$(OSTEO) report --runs $(RUNS) --out $(OUT) $(if $(ALL),--all)

# External validation: a run's best model on another labelled folder (RUN/eval/<folder>/)
eval: install
	@test -n "$(RUN)" || { echo "usage: make eval RUN=runs/<model>/<run-id> DATA=folder [TTA=1]" >&2; exit 2; }
	@test "$(origin DATA)" != "file" || { echo "make eval: name the folder to score with DATA=" >&2; exit 2; }
	$(OSTEO) eval $(RUN) --data $(DATA) $(if $(TTA),--tta)

# A run's best model for other systems, preprocessing and calibration inside (osteo.export):
# make export RUN=runs/<model>/<run-id> [FORMAT=onnx|savedmodel|keras] writes RUN/export/.
FORMAT ?= onnx
export: install
	@test -n "$(RUN)" || { echo "usage: make export RUN=runs/<model>/<run-id> [FORMAT=onnx|savedmodel|keras]" >&2; exit 2; }
	$(OSTEO) export $(RUN) --format $(FORMAT)

# The whole study on the phantom, CPU-sized (recipes/demo.py): each backbone in its own
# process, so each gets the Keras backend measured fastest for it.
DEMO_RUNS := runs/demo
DEMO_OUT := reports/demo
demo: install
	@start=$$(date +%s); \
	for m in $(STUDY_MODELS); do \
		echo "== demo: training $$m ($$(( $$(date +%s) - start ))s so far)"; \
		$(OSTEO) train demo --model $$m --runs $(DEMO_RUNS) || exit 1; \
	done; \
	echo "== demo: report"; \
	$(OSTEO) report --runs $(DEMO_RUNS) --out $(DEMO_OUT) || exit 1; \
	echo "== demo: done in $$(( $$(date +%s) - start ))s; open $(CURDIR)/$(DEMO_OUT)/index.html"

# The study as Ray Tune trials (osteo[study], installed by `install`). By default 2 backbones
# x 2 folds of the demo recipe on the demo phantom; DATA, MODELS (comma-separated), RECIPE,
# FOLDS, SEEDS, EPOCHS, WEIGHTS, IMAGE_SIZE and RUNS change it. SEARCH=KEY=LO:HI:log (e.g.
# train.fine_tune_lr=1e-4:1e-2:log) searches it per outer fold first, TRIALS each (default 3).
given = $(filter command line environment,$(origin $(1)))
STUDY_DATA = $(if $(call given,DATA),$(DATA),data/phantom-demo)
STUDY_OUT := reports/study
study: install
	@test -d $(STUDY_DATA) || $(OSTEO) data phantom $(STUDY_DATA) --n 900 --size 96
	$(OSTEO) study --models $(or $(MODELS),vgg16$(COMMA)densenet169) \
		--recipe $(if $(call given,RECIPE),$(RECIPE),demo) --folds $(if $(call given,FOLDS),$(FOLDS),2) \
		--data $(STUDY_DATA) --runs $(if $(call given,RUNS),$(RUNS),runs/study) --out $(STUDY_OUT) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
		$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(SEARCH),--search $(SEARCH) --trials $(or $(TRIALS),3))

# A comma inside $(if ...) would split its arguments: BENCH=full's sizes use this.
COMMA := ,
# Speed: the input pipeline and the models, osteo beside timm (BENCH=full: the long run).
# timm and its torch/torchvision pair live in .venv-bench (about 5.5 GB; see README).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31"
	touch $@

bench: install $(BENCH_VENV)/.installed
	$(PY) benchmarks/input_pipeline.py $(if $(filter full,$(BENCH)),,--n 1000 --large-n 100)
	$(PY) benchmarks/models.py --timm $(BENCH_VENV)/bin/python $(if $(filter full,$(BENCH)),--full --sizes 224$(COMMA)64,--sizes 64)
