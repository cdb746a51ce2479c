# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel of this torch lies on the project's machines; an unpinned torch would fetch a CUDA build.
TORCH ?= torch==2.13.0
# Tests and benchmarks read real data from LLMMO_DATA_DIR, by default ../shared/data when it exists.
export LLMMO_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data))

.PHONY: install demo test bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# the test, lint and benchmark tools (pytest, hypothesis, ruff, transformers, matplotlib, the serving stack)
# (and Debian's chromium for the chat page's browser test, when it can be installed here)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && \
		apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "chromium is not installed: the browser test skips (fails under CI=true); apt-get install chromium"
	touch $@

demo: install
	rm -rf runs/demo
	$(VENV)/bin/llmmo train --config configs/demo.yaml
	$(VENV)/bin/llmmo generate runs/demo/ckpt-best --prompt "def " --max-new-tokens 300 \
		--temperature 0.8 --top-k 50 --seed 0

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks.run

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
