# Two commands from a fresh clone: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test bench gpu-check venv venv-dev chromium clean keys flower compose-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project itself, editable and without dependencies (the pins above are the dependencies):
# this installs the `imgsvc` console script. No build isolation, so it needs no download.
$(RUNTIME_STAMP): requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

venv: $(RUNTIME_STAMP)
venv-dev: $(DEV_STAMP)

# Development secrets, made once under var/ unless SECRET_KEY / WEBHOOK_SECRET are given
# (docker-compose and real deployments set their own): SECRET_KEY derives each API key's webhook
# secret; WEBHOOK_SECRET signs callbacks of jobs sent without a key.
var/secret_key:
	@mkdir -p var && umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(32))" > $@
var/webhook_secret:
	@mkdir -p var && umask 077 && $(PYTHON) -c "import base64, secrets; \
		print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())" > $@
DEV_SECRETS = export SECRET_KEY=$${SECRET_KEY:-$$(cat var/secret_key)} \
	WEBHOOK_SECRET=$${WEBHOOK_SECRET:-$$(cat var/webhook_secret)};

# Redis: the REDIS_URL (and CACHE_URL) given, or two embedded redis-servers: the main one (data
# under var/redis, noeviction) and the cache (allkeys-lru, CACHE_MAXMEMORY). See docs/scaling.md.
# honcho hands each process its own $$PORT, so the web port travels as WEB_PORT. The Procfile's
# commands (celery, gunicorn, python) are the virtualenv's: it comes first on PATH.
run: venv var/secret_key var/webhook_secret
	@$(DEV_SECRETS) export WEB_PORT=$${PORT:-8000} PATH="$(CURDIR)/$(BIN):$$PATH"; \
	if [ -n "$$REDIS_URL" ]; then \
		echo "Using Redis at $$REDIS_URL (cache: $${CACHE_URL:-the same server})"; \
		exec $(BIN)/honcho start worker webhooks web; \
	else \
		export REDIS_URL=redis://127.0.0.1:$${REDIS_PORT:-6379}/0 CACHE_URL=redis://127.0.0.1:$${CACHE_PORT:-6380}/0; \
		echo "Starting embedded Redis at $$REDIS_URL, its cache at $$CACHE_URL"; exec $(BIN)/honcho start; \
	fi

# API keys against the same Redis and SECRET_KEY as `make run`: make keys ARGS="create acme"
keys: venv var/secret_key
	@$(DEV_SECRETS) $(BIN)/flask --app web.wsgi keys $(ARGS)

# Flower, Celery's own monitor, against the same Redis as `make run` (or REDIS_URL):
# http://127.0.0.1:5555 (FLOWER_PORT), with our workers, queues and tasks.
flower: venv
	@export REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:$${REDIS_PORT:-6379}/0}; \
	exec $(BIN)/celery -A worker.celery_app flower --address=127.0.0.1 --port=$${FLOWER_PORT:-5555}

# The page test drives Debian's Chromium (Playwright's own browser download is not used).
chromium:
	@command -v chromium >/dev/null || { \
		echo "Installing Debian's chromium for the browser test (needs root)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: venv-dev chromium
	$(BIN)/python -m pytest

# docker-compose.yml on a real Docker engine: build, start on the CPU, classify a photo, check the
# heatmap and a signed callback, scale to two workers, tear down. Slow (minutes), so not in `make test`.
compose-test: venv-dev
	$(BIN)/python scripts/compose_test.py

bench: venv-dev
	$(BIN)/python -m bench

# On a CUDA GPU: every cuda-marked test, then the GPU benchmark, into $$OUT/gpu-check.json (or
# gpu-check/); skips cleanly without a GPU. ARGS=--dry-run rehearses every step on the CPU.
gpu-check: venv-dev
	$(BIN)/python -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache test-artifacts bench/results.json gpu-check
