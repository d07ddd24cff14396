# The README's two commands: `make demo` and `make test`. Both set up
# everything they need from nothing (a venv in .venv with the package).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean chromium hosttools notebooks docs plot

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dragon-nb demo --nodes 4

# The browser test drives Debian's Chromium through Playwright (never
# `playwright install`, which downloads a browser of its own).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium </dev/null; \
	    else \
	        echo "tests/test_browser.py needs Debian's chromium: sudo apt-get install chromium"; \
	    fi; \
	fi

# tests/test_hosts.py makes test hosts with network namespaces (iproute2, as root)
hosttools:
	@if ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 util-linux </dev/null; \
	    else \
	        echo "tests/test_hosts.py needs root and iproute2: sudo apt-get install iproute2"; \
	    fi; \
	fi

test: $(STAMP) chromium hosttools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_pool.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_ddict.py
	$(PY) benchmarks/bench_hosts.py
	$(PY) benchmarks/bench_mp.py

# re-run the tutorial notebooks and store their outputs (then `make test` checks them)
notebooks: $(STAMP)
	$(PY) notebooks/refresh.py

clean:
	rm -rf $(VENV) build *.egg-info

# the documentation site (MkDocs) into build/site; a warning is an error
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

# docs/img/benchmarks.svg from the figures `make bench` wrote to benchmarks/results/
plot: $(STAMP)
	$(PY) benchmarks/plot.py
