# Two commands for a newcomer: `make dev` and `make test`. Everything else is a convenience.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Reinstall when the dependency pins change. pip's and setuptools' chatter (the editable-install
# banner among it) goes to $(VENV)/install.log; on failure that log is shown, so errors stay visible.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/pip install --quiet --upgrade pip > $(VENV)/install.log 2>&1 \
	  && $(BIN)/pip install --quiet -e '.[test]' >> $(VENV)/install.log 2>&1 \
	  || { cat $(VENV)/install.log >&2; echo "install failed (log: $(VENV)/install.log)" >&2; exit 1; }
	@touch $(STAMP)

# --exit-with-parent: if make goes away (killed, or SIGINT sent to make alone), billing dev stops too.
# DEV_ARGS: more `billing dev` options (--data-dir, --temporal-port, --ui-port).
DEV_ARGS ?=
dev: $(STAMP)
	$(BIN)/billing dev --exit-with-parent $(DEV_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
