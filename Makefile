# Two commands: `make dev` runs the whole system, `make test` runs the tests (after `make lint`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev lint test bench bench-fanout clean

# Herald itself (editable) with the extras for `make dev` and `make test`; the
# runtime pins of requirements.txt first, as a Heroku-like builder installs them.
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Herald needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e '.[dev,test]'
	touch $(STAMP)

# A development secret, made once; `flask dev` reads `.env` (the shell's variables win).
.env:
	@echo "HERALD_SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))')" > .env
	@echo "made .env with a development HERALD_SECRET_KEY"

dev: $(STAMP) .env
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flask --app app dev

# ruff on the whole tree, mypy on the runtime (pyproject.toml: [tool.ruff], [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/pipeline.py $(BENCH_ARGS)

# The hub beside Flask-SocketIO (bench/fanout.py); its peer and client are the `bench` extra.
bench-fanout: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/fanout.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .dev .pytest_cache
