# kdcache: two jobs end to end (MNIST-1D, a language model), and the developer chores.
# `make help` lists the targets.
#
#   make run    set up .venv; for each job train the teacher, run it once into caches, train the
#               students from them; write runs/report.md       (the README's first command)
#   make test   set up .venv and run the test suite            (the README's second command)
#
# Every stage is idempotent: a finished stage is skipped (teacher: its model.pt exists) or is a
# no-op inside kdcache (a cache hit; an already trained student), an interrupted one resumes.
# Override any variable on the command line: make run TEMPERATURE=2 TOPK=4 RUNS=runs-t2

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

PYTHON ?= python3
VENV ?= .venv
# Only here is torch pinned (pyproject.toml takes a range): the CPU wheel for a fresh machine.
# GPU users: make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# bench is in: the default test suite smoke-tests the benchmarks, one of which reads `datasets`;
# lm is in: the language-model examples (transformers, tokenizers) are tested by default too.
EXTRAS ?= dev,bench,lm
RUNS ?= runs
TEMPERATURE ?= 4
TOPK ?= 8
CACHE ?= $(RUNS)/cache/mnist1d-T$(TEMPERATURE)-k$(TOPK)
# Augmentation-consistent soft labels: VIEWS seeded views of every sample, each through the teacher.
VIEWS ?= 8
VIEWS_CACHE ?= $(CACHE)-views$(VIEWS)
AUGMENT ?= kdcache.pipeline.examples.augment:signal_1d
VIEWS_CONFIG ?= configs/views.toml
EPOCHS ?=
DEVICE ?= auto
# One intra-op thread per process: these models are tiny, and on a small shared machine extra
# threads mostly spin. Set THREADS= (empty) to let torch decide.
THREADS ?= 1
TEACHER_CONFIG ?= configs/teacher.toml
STUDENTS_CONFIG ?= configs/students.toml
DATA_DIR ?= $(RUNS)/data
PRECOMPUTE_ARGS ?=
TRAIN_ARGS ?=
# The language-model job (make run-lm): sizes chosen to fit 2 CPU cores in minutes, not hours.
LM_RUNS ?= $(RUNS)/lm
LM_CONFIG ?= configs/lm
LM_VOCAB ?= 4096
LM_BLOCK ?= 64
LM_TOKENS ?= 300000
LM_EVAL_TOKENS ?= 40000
LM_TOKENIZER_BYTES ?= 8000000
# The teacher: `committed` restores checkpoints/lm-teacher.safetensors (sha256, size, corpus and
# tokenizer checked against its card, lm-teacher.json); `train` trains it here, on
# LM_TEACHER_TOKENS of the train split with one thread (deterministic: see the README), which
# `make lm-teacher-checkpoint` turns into those two files.
LM_TEACHER ?= committed
LM_TEACHER_SIZE ?= n_layer=4 n_embd=176 n_head=4
LM_TEACHER_TOKENS ?= 10000000
LM_TEACHER_EPOCHS ?= 1
LM_TEACHER_THREADS ?= 1
LM_TEACHER_CARD ?= checkpoints/lm-teacher.json
LM_STUDENT ?= n_layer=1 n_embd=64 n_head=2
# Enough epochs that validation loss has mostly stopped falling (README: the curves).
LM_EPOCHS ?= 3
LM_BATCH ?= 16
# Seeds of the hard, sampled, matched-topk and online students (topk k = LM_TOPK: the first).
LM_SEEDS ?= 0 1 2
LM_JOBS ?= 2
LM_JOB_THREADS ?= 1
LM_SAMPLES ?= 50
LM_TOPK ?= 64
# The LM job's targets, judged in the report's headline (nats/token): the sampled student within
# LM_NEAR_ONLINE of online KD, the best cache student LM_OVER_HARD better than hard labels.
LM_NEAR_ONLINE ?= 0.03
LM_OVER_HARD ?= 0.05
REPORT_TARGETS = --lm-near-online $(LM_NEAR_ONLINE) --lm-over-hard $(LM_OVER_HARD)
# The LM job's models are big enough for both cores to pay off (MNIST-1D's are not: THREADS=1).
LM_THREADS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdcache-setup
TEACHER_DIR := $(RUNS)/teacher
MNIST1D := kdcache.pipeline.examples.mnist1d:MNIST1D
DATA_PY := from kdcache.pipeline.examples.mnist1d import MNIST1D; [print(MNIST1D(split=s)) for s in ("train+transfer", "test")]
# Job commands see the data cache dir (MNIST-1D is generated once into it) and the thread count.
kdcache_with = KDCACHE_DATA_DIR=$(DATA_DIR) $(if $(1),OMP_NUM_THREADS=$(1)) $(VENV)/bin/kdcache
KDCACHE := $(call kdcache_with,$(THREADS))

.PHONY: help setup data teacher precompute students report run test test-quick faults lint bench \
	cron clean distclean run-lm lm-teacher lm-teacher-committed lm-teacher-checkpoint lm-caches \
	lm-students views-cache views-students FORCE

# --flag a --flag b ... from a list of k=v words
kv = $(foreach a,$(2),$(1) $(a))
GPT2 := kdcache.pipeline.examples.lm:gpt2
LM_DATA := kdcache.pipeline.examples.text:TextBlocks
LM_CACHE := $(LM_RUNS)/caches
LM_TEACHER_DIR := $(LM_RUNS)/teacher
LM_TEXT := vocab=$(LM_VOCAB) block=$(LM_BLOCK) max_bytes=$(LM_TOKENIZER_BYTES)
LM_DATA_ARGS := $(call kv,--data-arg,$(LM_TEXT) max_tokens=$(LM_TOKENS))
LM_EVAL_ARGS := $(call kv,--eval-data-arg,$(LM_TEXT) max_tokens=$(LM_EVAL_TOKENS))
LM_SIZE := vocab_size=$(LM_VOCAB) n_positions=$(LM_BLOCK)
LM_TEACHER_MODEL := --teacher $(GPT2) $(call kv,--teacher-arg,$(LM_SIZE) $(LM_TEACHER_SIZE)) \
	--checkpoint $(LM_TEACHER_DIR)/model.pt
LM_KDCACHE := $(call kdcache_with,$(LM_THREADS))
LM_PRECOMPUTE := $(LM_KDCACHE) precompute --task causal-lm $(LM_TEACHER_MODEL) --data $(LM_DATA) \
	$(LM_DATA_ARGS) --shard-rows 1024 --device $(DEVICE) $(PRECOMPUTE_ARGS)
comma := ,
space := $(subst ,, )
LM_ENV := KDCACHE_DATA_DIR=$(DATA_DIR) OMP_NUM_THREADS=$(LM_JOB_THREADS)
# Each run one process on LM_JOB_THREADS threads, LM_JOBS at once (tiny models: two one-thread
# processes beat one two-thread process on 2 cores).
LM_TRAIN_ONE := $(call kdcache_with,$(LM_JOB_THREADS)) train --config $(LM_CONFIG)/students.toml \
	--out $(LM_RUNS)/students --seeds $(subst $(space),$(comma),$(strip $(LM_SEEDS))) \
	$(call kv,--student-arg,$(LM_SIZE) $(LM_STUDENT)) $(LM_DATA_ARGS) $(LM_EVAL_ARGS) \
	--epochs $(LM_EPOCHS) --batch-size $(LM_BATCH) --threads $(LM_JOB_THREADS) \
	--device $(DEVICE) $(TRAIN_ARGS)
LM_ARGS_kd-sampled := --cache $(LM_CACHE)/sampled
LM_ARGS_kd-topk-matched := --cache $(LM_CACHE)/topk-matched
LM_ARGS_kd-topk-large := --cache $(LM_CACHE)/topk-$(LM_TOPK)
LM_ARGS_kd-online := $(subst --checkpoint,--teacher-checkpoint,$(LM_TEACHER_MODEL))
# The longest first (online KD pays the teacher every epoch; then the Trainer run, about twice
# a kdcache one), so the LM_JOBS slots end together.
LM_RUN_NAMES := $(foreach k,$(LM_SEEDS),kd-online-seed$(k)) hf \
	$(foreach n,hard kd-sampled kd-topk-matched,$(foreach k,$(LM_SEEDS),$(n)-seed$(k))) \
	kd-topk-large-seed$(firstword $(LM_SEEDS))

help: ## List the targets and the variables they take
	@echo "kdcache: make TARGET [VAR=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables (now): RUNS=$(RUNS) CACHE=$(CACHE) TEMPERATURE=$(TEMPERATURE) TOPK=$(TOPK)"
	@echo "  EPOCHS=$(EPOCHS) (empty: per-student epochs from $(STUDENTS_CONFIG)) DEVICE=$(DEVICE)"
	@echo "  THREADS=$(THREADS) PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC=$(TORCH_SPEC)"

run: setup data teacher precompute students views-students lm-students report ## Both jobs (MNIST-1D, then the language model), stage after stage
	@echo "done: see $(RUNS)/report.md"

run-lm: setup lm-students ## The language-model job alone (teacher, three caches, five students)
	$(KDCACHE) report --runs $(RUNS) --out $(RUNS)/report.md $(REPORT_TARGETS)
	@echo "done: see $(RUNS)/report.md"

lm-teacher: $(if $(filter train,$(LM_TEACHER)),$(LM_TEACHER_DIR)/model.pt,lm-teacher-$(LM_TEACHER)) ## The GPT teacher: the committed checkpoint, or LM_TEACHER=train trains it here

# Checked on every run (a hash of a few MB): a folder already restored from it is left alone.
lm-teacher-committed: | $(STAMP)
	KDCACHE_DATA_DIR=$(DATA_DIR) $(PY) -m kdcache.pipeline.examples.lm_teacher restore \
		--card $(LM_TEACHER_CARD) --out $(LM_TEACHER_DIR) \
		$(call kv,--student-arg,$(LM_SIZE) $(LM_TEACHER_SIZE)) $(call kv,--data-arg,$(LM_TEXT))

lm-teacher-%:
	@echo "LM_TEACHER=$* is not one of committed, train (the teacher's size is LM_TEACHER_SIZE)" >&2
	@exit 2

# Trained once (skipped while model.pt exists), except over a folder restored from the committed
# checkpoint: that one is replaced.
$(LM_TEACHER_DIR)/model.pt: $(if $(wildcard $(LM_TEACHER_DIR)/committed.json),FORCE) | $(STAMP)
	if [ -e $(LM_TEACHER_DIR)/committed.json ]; then rm -rf $(LM_TEACHER_DIR); fi
	$(call kdcache_with,$(LM_TEACHER_THREADS)) train --config $(LM_CONFIG)/teacher.toml \
		--out $(LM_TEACHER_DIR) $(call kv,--student-arg,$(LM_SIZE) $(LM_TEACHER_SIZE)) \
		$(call kv,--data-arg,$(LM_TEXT) max_tokens=$(LM_TEACHER_TOKENS)) $(LM_EVAL_ARGS) \
		--epochs $(LM_TEACHER_EPOCHS) --threads $(LM_TEACHER_THREADS) --device $(DEVICE) \
		$(TRAIN_ARGS)

lm-teacher-checkpoint: $(LM_TEACHER_DIR)/model.pt ## Rebuild the committed teacher: train it (LM_TEACHER=train), write LM_TEACHER_CARD + weights
	$(PY) -m kdcache.pipeline.examples.lm_teacher export --run $(LM_TEACHER_DIR) \
		--card $(LM_TEACHER_CARD)

FORCE:

lm-caches: lm-teacher ## Stage one x3: sampled (N draws), topk at the same file bytes/token, topk k=LM_TOPK
	$(LM_PRECOMPUTE) --out $(LM_CACHE)/sampled --codec sampled --samples $(LM_SAMPLES)
	budget=$$($(KDCACHE) inspect $(LM_CACHE)/sampled --json | $(PY) -c \
		'import json, sys; print(json.load(sys.stdin)["disk_bytes_per_token"])'); \
	$(LM_PRECOMPUTE) --out $(LM_CACHE)/topk-matched --codec topk --budget-bytes-per-token $$budget
	$(LM_PRECOMPUTE) --out $(LM_CACHE)/topk-$(LM_TOPK) --codec topk --top-k $(LM_TOPK)

lm-students: lm-caches ## Stage two: the same student taught five ways, LM_SEEDS seeds each, LM_JOBS at once
	$(MAKE) --no-print-directory --output-sync=target -j$(LM_JOBS) \
		$(addprefix lm-student-,$(LM_RUN_NAMES))

# One run: NAME-seedK of configs/lm/students.toml (seed K: data order and initial weights).
# Only through lm-students, which makes the caches first.
lm-student-%:
	$(LM_TRAIN_ONE) --only $* --student-arg seed=$(lastword $(subst -seed, ,$*)) \
		$(LM_ARGS_$(firstword $(subst -seed, ,$*)))

# The sampled cache's student once more, trained by transformers' Trainer (kdcache.KDTrainer).
lm-student-hf:
	$(LM_ENV) $(PY) -m kdcache.pipeline.examples.lm_hf_student --cache $(LM_CACHE)/sampled \
		--out $(LM_RUNS)/students/kd-sampled-hf --data $(LM_DATA) $(LM_DATA_ARGS) \
		--eval-data $(LM_DATA) $(LM_EVAL_ARGS) --student $(GPT2) \
		$(call kv,--student-arg,$(LM_SIZE) $(LM_STUDENT) seed=0) --epochs $(LM_EPOCHS) \
		--batch-size $(LM_BATCH) --alpha 0.9 --seed 0 --device $(DEVICE)

setup: $(STAMP) ## Create .venv: CPU torch (TORCH_SPEC), then kdcache[dev,bench,lm] editable

# Reruns only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "kdcache needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1). Try PYTHON=python3.11" >&2; \
		exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $@

data: setup ## Generate MNIST-1D (train, test, 30,000 transfer) into DATA_DIR once
	KDCACHE_DATA_DIR=$(DATA_DIR) $(PY) -c '$(DATA_PY)'

teacher: $(TEACHER_DIR)/model.pt ## Train the teacher CNN on the 4,000 labeled samples (skipped once done)

$(TEACHER_DIR)/model.pt: | $(STAMP)
	$(KDCACHE) train --config $(TEACHER_CONFIG) --out $(TEACHER_DIR) --device $(DEVICE) $(TRAIN_ARGS)

precompute: teacher ## Stage one: the teacher once over train+transfer into CACHE (a rerun is a cache hit)
	$(KDCACHE) precompute --teacher kdcache.pipeline.examples.models:TeacherCNN \
		--checkpoint $(TEACHER_DIR)/model.pt --data $(MNIST1D) --data-arg split=train+transfer \
		--out $(CACHE) --codec topk --top-k $(TOPK) --temperature $(TEMPERATURE) \
		--features features --shard-rows 4096 --device $(DEVICE) $(PRECOMPUTE_ARGS)

students: precompute ## Stage two: every student in STUDENTS_CONFIG from CACHE, into RUNS/students
	$(KDCACHE) train --config $(STUDENTS_CONFIG) --cache $(CACHE) --out $(RUNS)/students \
		--device $(DEVICE) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

views-cache: teacher ## Stage one again: VIEWS augmented views (AUGMENT) per sample into VIEWS_CACHE
	$(KDCACHE) precompute --teacher kdcache.pipeline.examples.models:TeacherCNN \
		--checkpoint $(TEACHER_DIR)/model.pt --data $(MNIST1D) --data-arg split=train+transfer \
		--out $(VIEWS_CACHE) --codec topk --top-k $(TOPK) --temperature $(TEMPERATURE) \
		--views $(VIEWS) --augment $(AUGMENT) --shard-rows 4096 --device $(DEVICE) $(PRECOMPUTE_ARGS)

# The students of VIEWS_CONFIG, trained with AUGMENT: views replayed from VIEWS_CACHE, and the
# same student on CACHE's soft labels of the plain inputs (the naive pairing).
views-students: views-cache precompute ## Stage two with augmentation: replayed views vs naive, into RUNS/students
	$(KDCACHE) train --config $(VIEWS_CONFIG) --only mlp-kd-t4-views --cache $(VIEWS_CACHE) \
		--out $(RUNS)/students --device $(DEVICE) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)
	$(KDCACHE) train --config $(VIEWS_CONFIG) --only mlp-kd-t4-naive --cache $(CACHE) \
		--augment $(AUGMENT) --out $(RUNS)/students --device $(DEVICE) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

report: students views-students ## RUNS/report.md + report.json + the plots of both jobs (an absent job is left out)
	$(KDCACHE) report --runs $(RUNS) --out $(RUNS)/report.md $(REPORT_TARGETS)

# CI runs `make test`: every test, the slow MNIST-1D ones and tests/faults included (842 tests:
# 10 min 15 s of pytest on 2 cores, 12 min 22 s under OMP_NUM_THREADS=1, measured on clean clones).
test: setup ## Every test, slow ones included (what CI runs)
	$(PY) -m pytest -m 'slow or not slow' $(PYTEST_ARGS)

test-quick: setup ## The suite without the slow tests (about 5 min)
	$(PY) -m pytest $(PYTEST_ARGS)

# The rows land beside the runs (git-ignored); the table is rewritten only after a green run.
FAULT_ROWS := $(RUNS)/faults.jsonl
faults: setup ## The fault-injection campaign (tests/faults); writes its table to docs/RELIABILITY.md
	@mkdir -p $(RUNS) && rm -f $(FAULT_ROWS)
	KDCACHE_FAULT_ROWS=$(abspath $(FAULT_ROWS)) $(PY) -m pytest tests/faults -m 'slow or not slow' $(PYTEST_ARGS)
	$(PY) -m tests.faults.render $(FAULT_ROWS) docs/RELIABILITY.md

lint: setup ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup ## The benchmarks (bench/run_all.py); not timed tests
	$(PY) -m bench.run_all $(BENCH_ARGS)

cron: ## `make run` under a non-blocking lock; skips (exit 0) while another run holds it
	@mkdir -p $(RUNS)
	@flock --nonblock --conflict-exit-code 75 $(RUNS)/.make.lock $(MAKE) run || { rc=$$?; \
		[ $$rc -eq 75 ] || exit $$rc; echo "make cron: another run holds $(RUNS)/.make.lock; skipped"; }

clean: ## Delete RUNS (runs, caches, reports, generated data)
	rm -rf $(RUNS)

distclean: clean ## Also delete .venv and tool caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis bench/out
