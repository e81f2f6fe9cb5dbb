# Two commands do all set-up on a fresh machine:
#   make train   # create/refresh .venv, generate the shapes shards and their precompute cache,
#                # train the embedded default (experiment=shapes_cpu)
#   make test    # create/refresh .venv, run the test suite (slow tests excluded)
#   make lora    # after make train: teach its checkpoint the star with a LoRA (experiment=lora_tiny_cpu)
#   make compose # the compositional world's shards and cache, then experiment=tiny_compose_cpu (README,
#                # "Evaluate a model"), its plot in runs/tiny_compose_cpu/main/eval_curves.png
#   make study STUDY=sd3_table1   # a study of SD3's recipe (README, "Study the recipe"):
#                # runs/studies/<study>/report.md
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The environment is rebuilt whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: env data train lora compose-data compose study test test-all clean-runs

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# shapes_cpu trains on the precompute cache (its data.shards name it), so the encoders read the
# shards named here; shards already in the cache are skipped.
data: $(STAMP)
	$(BIN)/python -m sd3train.tools.make_shapes --out data/shapes
	for shards in 'train-{000000..000007}' val-000000; do \
		$(BIN)/sd3train-precompute --out data/shapes_cache experiment=shapes_cpu data.cached=false \
			"data.shards=data/shapes/$$shards.tar" || exit 1; \
	done

train: data
	WANDB_SILENT=true $(BIN)/sd3train-train experiment=shapes_cpu $(ARGS)

# The LoRA demo starts from make train's checkpoint; the star folder is generated (data/concepts/star).
BASE_CHECKPOINT := runs/shapes_cpu/main/checkpoints/last
lora: $(STAMP)
	@test -e $(BASE_CHECKPOINT) || { echo "make lora: $(BASE_CHECKPOINT) is missing: run make train first" >&2; exit 1; }
	$(BIN)/python -m sd3train.tools.make_concept --out data/concepts/star
	WANDB_SILENT=true $(BIN)/sd3train-train experiment=lora_tiny_cpu $(ARGS)

# Several shapes per image, captioned in six categories (sd3train/data/scenes.py); 8192 training images.
compose-data: $(STAMP)
	$(BIN)/python -m sd3train.tools.make_shapes --world compose --out data/compose --train 8192
	for shards in 'train-{000000..000015}' val-000000; do \
		$(BIN)/sd3train-precompute --out data/compose_cache experiment=tiny_compose_cpu data.cached=false \
			"data.shards=data/compose/$$shards.tar" || exit 1; \
	done

compose: compose-data
	WANDB_SILENT=true $(BIN)/sd3train-train experiment=tiny_compose_cpu $(ARGS)
	$(BIN)/python -m sd3train.tools.plot_eval runs/tiny_compose_cpu/main

# The studies train the embedded default on make data's cache (conf/study/*.yaml).
STUDY ?= sd3_table1
study: data
	WANDB_SILENT=true $(BIN)/sd3train-study study=$(STUDY) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs outputs
