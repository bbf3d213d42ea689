# rgemma — `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# setuptools reports every editable install of a flat layout with a boxed notice ("Editable
# installation ... folders in your working directory with the same name as your package");
# information, not a fault: keep `make install` quiet
EDITABLE = PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install install-reference test test-generic test-live fixtures bench docs clean

install: $(BIN)/rgemma
$(BIN)/rgemma: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(EDITABLE) $(BIN)/pip install --quiet -e '.[serve,test]'
	@# compile the Numba kernels once now (they are cached), so the first real run starts warm
	$(BIN)/rgemma generate -m demo -n 1 -t 0 -q "Hello" > /dev/null
	@touch $@
	@echo "installed: activate with '. $(VENV)/bin/activate', then run 'rgemma --help'"

# The references (torch CPU, transformers, recurrentgemma): only for fixtures and live parity.
install-reference: install
	$(EDITABLE) $(BIN)/pip install --quiet -e '.[serve,test,reference]'
	$(BIN)/pip install --quiet --no-deps recurrentgemma==1.0.1

# On a fresh clone `make test` installs first (the venv is a prerequisite, not a surprise).
test: $(BIN)/rgemma
	$(BIN)/python -m pytest -q

# The suite with Numba compiling for a generic x86-64 / aarch64 target: no host-specific kernel
# (kernels/cpu.py selects the portable loops), as on a CPU the x86 paths do not know.
test-generic:
	NUMBA_CPU_NAME=generic $(BIN)/python -m pytest -q -p no:cacheprovider $(TESTS)

fixtures: install-reference
	$(BIN)/python scripts/fixtures/make_fixtures.py

bench: install-reference
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

docs: $(BIN)/rgemma
	$(BIN)/python scripts/docs/gen_usage.py
	$(BIN)/python scripts/docs/gen_api.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
