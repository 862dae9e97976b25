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

.PHONY: help install test test-all lint data audit train cv train-all report bench demo study clean export eval

install: $(STAMP)

help:  ## the targets, and the variables they take
	@echo "make install | demo | test | test-all | lint | bench [BENCH=full] | clean"
	@echo "     data | audit DATA=dir | train MODEL=m [DATA=dir] | train-all | cv FOLDS=k | study MODELS=a,b"
	@echo "     report | eval RUN=r DATA=dir | export RUN=r [FORMAT=onnx|savedmodel|keras]"
	@echo "variables: DATA MODEL RECIPE EPOCHS WEIGHTS IMAGE_SIZE BATCH SEED RUNS RESUME FOLDS OUT SET (README.md: Your own data)"

# PyTorch and torchvision first, as the pair that imports together (timm, the PyTorch
# engine, needs both): on x86_64 with Python 3.11 pip takes torch 2.14.1 (a CUDA build,
# which also runs on the CPU; ~5.5 GB) and torchvision 0.29.1 from this registry's disk;
# on aarch64 the CPU pair 2.9.1 / 0.24.1. Then osteo with timm and the test tools.
TORCH_PAIR := $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)
# The environment's 22,000 Python files are byte-compiled here, on every core: pip compiles them
# on one (85 CPU s, 44 s on 2 processes). They must be compiled at install: where
# PYTHONDONTWRITEBYTECODE is set (this machine and its CI) no process writes what it compiles, and
# without them every test process compiled TensorFlow again (the suite: 17.1 min, not 11.2;
# 2026-12-06). A file of a newer Python's syntax (torch's py312_intrinsics.py) is skipped, as
# pip skips it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip install -q --no-compile $(TORCH_PAIR)
	$(PY) -m pip install -q --no-compile -e ".[dev,study,torch]"
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

# Keras' backend is fixed at import: the suite runs on TensorFlow, then the PyTorch
# engine's own tests run again on PyTorch (they skip themselves on TensorFlow).
# The TensorFlow suite runs in TEST_WORKERS processes (pytest-xdist), a test file per
# process, so a file's module fixtures are built once: on 2 cores 7.3 min against 12.3
# serially (the tests wait on subprocesses and single-threaded Python much of the time).
# The PyTorch files run on 2 workers too: 140 and 147 s against 181 and 191 serially,
# interleaved (2026-12-06; an earlier pair gave 2.1 against 2.3 min). xdist hands out the
# files with the most tests first; handing out the longest first instead (--no-loadscope-reorder) was slower,
# 13.3 min against 11.2 (2026-12-06): the Ray studies of test_kills.py and test_study.py then
# ran at the same time and fought over the 2 cores (the Ray study fixture took 128 s, not 84);
# both are in test_study.py now, so one worker runs them one after the other.
# So was running the PyTorch files beside the TensorFlow suite: 15.6 min against 13.7 one after
# the other. TEST_WORKERS=0 runs everything in this process (a debugger, -x).
TORCH_TESTS := tests/test_timm_engine.py tests/test_export_timm.py tests/test_device_waits.py
TEST_WORKERS ?= 2
PARALLEL = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)
# --durations: every log says where the time went. make test took 21:12 on the AVX2 class (12:14 on
# AVX-512), over the 15 minutes a developer's run may take: the longest tests (pytest.mark.heavy,
# 17-131 s each there) run only where OSTEO_CI is set, as CI's .ci/run sets it, and in test-all.
# Without them, on a clean clone of the AVX2 class: 13:10 and 13:40 (2026-12-07), install included.
test: install
	$(PY) -m pytest -q $(PARALLEL) --durations=20
	KERAS_BACKEND=torch $(PY) -m pytest -q $(PARALLEL) --durations=10 $(TORCH_TESTS)

test-all: install
	OSTEO_SLOW=1 OSTEO_HYPOTHESIS=explore $(PY) -m pytest -q $(PARALLEL)
	OSTEO_SLOW=1 KERAS_BACKEND=torch $(PY) -m pytest -q $(PARALLEL) $(TORCH_TESTS)

# ruff, then the import contracts of pyproject.toml (the floors of docs/ARCHITECTURE.md)
lint: install
	$(VENV)/bin/ruff check osteo tests recipes benchmarks
	$(VENV)/bin/lint-imports

data: install
	@test -d '$(DATA)/normal' || $(OSTEO) data phantom '$(DATA)'

audit: install
	$(OSTEO) data audit '$(DATA)' --out '$(OUT)/audit'

clean:
	rm -rf $(VENV) data/phantom data/phantom-demo runs reports .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Make variables pass through to `osteo train`; DATA only when given (the default is the phantom).
# Paths are quoted for the shell: a folder name may hold spaces (not a single quote).
TRAIN_ARGS = --model $(MODEL) \
	$(if $(filter command line environment,$(origin DATA)),--data '$(DATA)') \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights '$(WEIGHTS)') \
	$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(BATCH),--batch $(BATCH)) \
	$(if $(SEED),--seed $(SEED)) $(if $(RESUME),--resume '$(RESUME)') \
	$(if $(filter command line environment,$(origin RUNS)),--runs '$(RUNS)') \
	$(foreach s,$(SET),--set '$(s)')
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
	$(OSTEO) report --runs '$(RUNS)' --out '$(OUT)' $(if $(ALL),--all)

# External validation: a run's best model on another labelled folder (RUN/eval/<folder>/)
eval: install
	@test -n "$(RUN)" || { echo "usage: make eval RUN=runs/<model>/<run-id> DATA=folder [TTA=1]" >&2; exit 2; }
	@test "$(origin DATA)" != "file" || { echo "make eval: name the folder to score with DATA=" >&2; exit 2; }
	$(OSTEO) eval '$(RUN)' --data '$(DATA)' $(if $(TTA),--tta)

# A run's best model for other systems, preprocessing and calibration inside (osteo.export):
# make export RUN=runs/<model>/<run-id> [FORMAT=onnx|savedmodel|keras] writes RUN/export/.
FORMAT ?= onnx
export: install
	@test -n "$(RUN)" || { echo "usage: make export RUN=runs/<model>/<run-id> [FORMAT=onnx|savedmodel|keras]" >&2; exit 2; }
	$(OSTEO) export '$(RUN)' --format $(FORMAT)

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
# FOLDS, SEEDS, EPOCHS, WEIGHTS, IMAGE_SIZE, BATCH, SET, RUNS and OUT change it. SEARCH=KEY=LO:HI:log (e.g.
# train.fine_tune_lr=1e-4:1e-2:log) searches it per outer fold first, TRIALS each (default 3).
# EXTERNAL=folder[,folder...] scores each backbone's final model on other hospitals' folders.
given = $(filter command line environment,$(origin $(1)))
STUDY_DATA = $(if $(call given,DATA),$(DATA),data/phantom-demo)
STUDY_OUT = $(if $(call given,OUT),$(OUT),reports/study)
study: install
	@test -d '$(STUDY_DATA)' || $(OSTEO) data phantom '$(STUDY_DATA)' --n 900 --size 96
	$(OSTEO) study --models $(or $(MODELS),vgg16$(COMMA)densenet169) \
		--recipe $(if $(call given,RECIPE),$(RECIPE),demo) --folds $(if $(call given,FOLDS),$(FOLDS),2) \
		--data '$(STUDY_DATA)' --runs '$(if $(call given,RUNS),$(RUNS),runs/study)' --out '$(STUDY_OUT)' \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights '$(WEIGHTS)') \
		$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(SEARCH),--search $(SEARCH) --trials $(or $(TRIALS),3)) \
		$(if $(BATCH),--set data.batch_size=$(BATCH)) $(foreach s,$(SET),--set '$(s)') \
		$(foreach e,$(subst $(COMMA), ,$(EXTERNAL)),--external $(e))

# A comma inside $(if ...) would split its arguments: BENCH=full's sizes use this.
COMMA := ,
# Speed: the input pipeline and the models, osteo's engines beside timm's own loop
# (BENCH=full: the long run, every engine x precision x compile at 224 and 64 px).
bench: install
	$(PY) benchmarks/input_pipeline.py $(if $(filter full,$(BENCH)),,--n 1000 --large-n 100)
	$(PY) benchmarks/models.py $(if $(filter full,$(BENCH)),--full --sizes 224$(COMMA)64,--sizes 64)
