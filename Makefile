# Everything a fresh machine needs: `make demo` and `make test` create the virtual environment, install
# torch (CPU) when it is missing and the package (with its test tools for `make test`), and fetch the
# default assets into ~/.cache/sparsegpt (`make demo`: those it uses, as it uses them).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup assets test lint demo clean

setup: $(VENV)/.installed

SOURCES := pyproject.toml src/sparsegpt/formats/_cdecode.c src/sparsegpt/formats/_encoding.h \
	src/sparsegpt/runtime/_kernels.c src/sparsegpt/solver/_gram.c \
	src/sparsegpt/_attention.c src/sparsegpt/_elementwise.c src/sparsegpt/_exp.h

# $(1): what to install of the package ('.[dev]': with the test and benchmark tools)
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '$(1)'
	touch $@
endef

$(VENV)/.installed: $(SOURCES)
	$(call install,.[dev])

# the package alone, which is all `make demo` needs (a complete setup serves as well)
$(VENV)/.installed-package: $(SOURCES)
	$(call install,.)

DEMO_SETUP := $(if $(wildcard $(VENV)/.installed),$(VENV)/.installed,$(VENV)/.installed-package)

assets: setup
	$(BIN)/sparsegpt -q fetch-assets

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: assets lint
	$(BIN)/pytest -q

# the model and the texts it uses are fetched into the cache on first use
demo: $(DEMO_SETUP)
	$(BIN)/sparsegpt compare smollm2-135m --methods dense,magnitude,wanda,sparsegpt --sparsity 0.5 \
		--calib sotu:train --nsamples 128 --seqlen 512 --eval sotu:test --eval-windows 64

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
