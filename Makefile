# Targets named in README.md. `make test` is the one command CI runs (through .ci/run).
.PHONY: run test test-faults bench lint lock deps-upgrade stack-up stack-down stack-status clean

VENV := .venv
BIN := $(VENV)/bin

$(BIN)/broadcast-server: pyproject.toml requirements/dev.txt  ## .venv from the lock (scripts/venv.sh)
	bash scripts/venv.sh requirements/dev.txt
	touch $@

run: $(BIN)/broadcast-server  ## the server, embedded default (SQLite, in-process log and bus)
	$(BIN)/broadcast-server run

test:  ## everything: installs, starts the real stack, ruff, mypy --strict, import-linter, pytest
	bash scripts/test.sh

test-faults:  ## the quality gates and only the fault suite, printing what each scenario injected and verified
	bash scripts/test.sh -s tests/faults

bench: $(BIN)/broadcast-server  ## the benchmark suite (starts the real stack): make bench [SCENARIOS="idle fanout"] [BENCH_ARGS=--smoke]
	$(BIN)/broadcast-server bench $(SCENARIOS) $(BENCH_ARGS)

lint: $(BIN)/broadcast-server  ## the quality gates without the stack
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

lock: $(BIN)/broadcast-server  ## re-lock after editing pyproject.toml's dependencies, keeping the other pins
	bash scripts/lock.sh
	bash scripts/venv.sh requirements/dev.txt

deps-upgrade: $(BIN)/broadcast-server  ## re-resolve to the newest versions pyproject.toml allows, install, run the gates and unit tests
	bash scripts/lock.sh --upgrade
	bash scripts/venv.sh requirements/dev.txt
	$(MAKE) lint
	$(BIN)/pytest -p no:cacheprovider -q tests/unit
	git diff --stat -- requirements/

stack-up: $(BIN)/broadcast-server
	$(BIN)/broadcast-server stack up

stack-down: $(BIN)/broadcast-server
	$(BIN)/broadcast-server stack down

stack-status: $(BIN)/broadcast-server
	$(BIN)/broadcast-server stack status

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache broadcast.db*
