# Sluice: `make run` starts it, `make test` runs the whole suite, from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean system-deps

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gunicorn -c config/gunicorn.conf.py app:app

# The browser tests drive Debian's Chromium, the nginx tests run Debian's nginx, the
# proxy tests Debian's tinyproxy, the cluster tests Debian's redis-server (>= 7).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	command -v tinyproxy >/dev/null || test -x /usr/bin/tinyproxy || missing="$$missing tinyproxy"; \
	test -x /usr/bin/redis-server || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "make test needs:$$missing  (sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The in-process (test_client) and unit tiers only: no gunicorn, Chromium or nginx; seconds.
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "app or unit"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m bench

# Is something between here and a deployment buffering event streams? (docs/DEPLOY.md)
# make doctor URL=https://chat.example.com [IDLE=45]; exit 0 as sent, 1 held back/cut, 2 unreachable
.PHONY: doctor
doctor: $(STAMP)
	@test -n "$(URL)" || { echo "usage: make doctor URL=https://chat.example.com [IDLE=45]"; exit 2; }
	$(BIN)/python -m streaming.doctor "$(URL)" $(if $(IDLE),--idle $(IDLE))

clean:
	rm -rf $(VENV)
