# convlens: `make demo` installs everything and trains on the embedded digits dataset;
# `make test` installs the test dependencies and runs the whole test suite.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test browser lint bench docs clean

install:
	bash tools/install.sh

install-test:
	EXTRAS=test bash tools/install.sh

# Headless Chromium for the end-to-end browser test (Debian's package; skipped when absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: could not install chromium; browser tests will be skipped"; }

demo: install
	$(BIN)/convlens train

test: install-test browser
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/data.py

# Regenerate docs/figures/ from the commands in docs/tutorial.md (BUNDLE=runs/tutorial/model.convlens
# draws the class activation maps with a fully trained model instead of a short run).
docs: install
	$(BIN)/python docs/make_figures.py $(if $(BUNDLE),--bundle $(BUNDLE))

clean:
	rm -rf runs .pytest_cache .ruff_cache
