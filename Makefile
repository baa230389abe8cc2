# cellwatch: the two commands a newcomer needs are `make demo` and `make test`.
# Both set up what they need: a virtualenv with the extras and Mosquitto.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellwatch-installed
SRC_DIRS := node hub training shared client
PYTEST_ARGS ?=
DEMO_DIR ?= demo-work
SITES_DIR ?= sites-work

.PHONY: help demo up down test lint typecheck pytest venv mosquitto chromium clean

help:
	@echo "make demo   - set up and run the whole system end to end (deploy/demo.py; CHECKPOINT=path optional)"
	@echo "make up     - start broker, hub and one node with the demo configuration (make down stops them)"
	@echo "make up SITES=2 - a central broker and hub, two site brokers bridged to it, a node each (make down SITES=2)"
	@echo "make test   - set up (venv, Mosquitto, Chromium) and run ruff, mypy and pytest"
	@echo "make lint / make typecheck / make pytest - the parts of make test"
	@echo "make clean  - remove the virtualenv and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# Mosquitto: installed with apt-get when missing and we are root; otherwise say how.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then \
	  :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing mosquitto with apt-get"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients; \
	else \
	  echo "error: Mosquitto is not installed. Run: sudo apt-get install mosquitto mosquitto-clients" >&2; \
	  exit 1; \
	fi

# Chromium and its WebDriver (Debian's chromium, chromium-driver) for the fleet page's
# browser tests: installed with apt-get when missing and we are root; otherwise say how.
chromium:
	@if { command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium; } && \
	    { command -v chromedriver >/dev/null 2>&1 || test -x /usr/bin/chromedriver; }; then \
	  :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver with apt-get (browser tests)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else \
	  echo "error: Chromium is not installed. Run: sudo apt-get install chromium chromium-driver" >&2; \
	  exit 1; \
	fi

# mypy sees the sources under their import names (cellwatch.*) through links
# (made on every run, so a package added later is linked too).
.PHONY: .typecheck/cellwatch
.typecheck/cellwatch:
	@mkdir -p .typecheck/cellwatch
	@for d in $(SRC_DIRS); do ln -sfn ../../$$d .typecheck/cellwatch/$$d; done

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv .typecheck/cellwatch
	$(BIN)/mypy -p cellwatch
	$(BIN)/mypy tests bench deploy/demo.py deploy/sites.py deploy/demolib

pytest: venv mosquitto chromium
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# The whole system end to end on this machine, in $(DEMO_DIR)/ (deploy/demo.py).
demo: venv mosquitto
	$(BIN)/python deploy/demo.py run --workdir $(DEMO_DIR) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(INT8),--int8 $(INT8))

# Broker (ports 1883/8883), hub and one node with the demo's configuration, left
# running for the README's examples; `make down` stops them.
# With SITES=N: a central broker with the hub and N sites, each its own broker bridged
# to the centre with one node, site 1 with a relay (deploy/sites.py, in $(SITES_DIR)/).
up: venv mosquitto
ifdef SITES
	$(BIN)/python deploy/sites.py up --sites $(SITES) --workdir $(SITES_DIR)
else
	$(BIN)/python deploy/demo.py up --workdir $(DEMO_DIR)
endif

down:
	@if [ ! -x $(BIN)/python ]; then echo "nothing to stop: there is no $(VENV)"; \
	elif [ -n "$(SITES)" ]; then $(BIN)/python deploy/sites.py down --workdir $(SITES_DIR); \
	else $(BIN)/python deploy/demo.py down --workdir $(DEMO_DIR); fi

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache
