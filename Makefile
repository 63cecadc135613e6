# The commands the README opens with: `make demo`, `make test` and `make test-fast`.
# All create .venv on first use. torch is pinned to the CPU build that lies on
# this kind of machine's disk; pyproject.toml itself declares a normal range.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.privmed-installed

.PHONY: setup demo test test-fast lint bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,simulation]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/privmed demo

# Chromium and its driver for the clinic page's browser test, which skips without them.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	echo "Chromium could not be installed (apt-get as root needed); the browser test will skip."

# Four workers, a test file each at a time, the longest files first (tests/conftest.py): the
# federation tests mostly wait on processes, so they overlap with the CPU-bound ones on two
# cores (three workers left the CPUs idle 40% of the run); every process runs one thread.
test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest -q -n 4 --dist loadfile

# The edit-test loop: ruff, then the unit and in-process tests. Left out: tests that start
# long-lived processes or servers (Flower SuperLink/SuperNodes, `privmed serve`, the clinic,
# a browser, network namespaces, racing processes: `processes`), that run the CLI as a
# process (`cli`; tests/conftest.py sets both markers) and the long in-process ones (`slow`).
# Two workers for two cores: these tests are CPU-bound. CI runs `make test`, all of them.
test-fast: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest -q -n 2 -m "not processes and not cli and not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
