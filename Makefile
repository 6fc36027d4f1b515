# Two commands on a fresh machine: `make demo` (whole pipeline locally) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SAM_VENV := .tools/sam
STAMP := $(VENV)/.installed
SAM_STAMP := $(SAM_VENV)/.installed

.PHONY: venv browser test test-fast lint typecheck local demo bench validate layer parity deploy smoke clean \
	gallery-screenshot gpu-check gpu-wheels

$(STAMP): requirements/*.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(SAM_STAMP): requirements/sam.txt
	test -x $(SAM_VENV)/bin/python || $(PY) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q -r requirements/sam.txt
	touch $@

venv: $(STAMP) $(SAM_STAMP)

# Headless Chromium for the gallery's browser test: Debian's chromium-headless-shell (plus a font),
# installed with apt-get (sudo unless root) when no Chromium is on PATH and VAP_CHROMIUM is unset.
APT = $(if $(filter 0,$(shell id -u)),,sudo) apt-get
browser:
	@test -n "$$VAP_CHROMIUM" || command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || { \
		command -v apt-get >/dev/null || { echo "make browser: install Chromium or set VAP_CHROMIUM" >&2; exit 1; }; \
		$(APT) update -q && $(APT) install -y -q --no-install-recommends chromium-headless-shell fonts-liberation; }

# The whole suite: lint, types, template checks (cfn-lint, sam validate/build), the layer check,
# unit, model (slow ones too) and local-stack tests, `make smoke` against the local stack included,
# `vap gallery` in headless Chromium (`make browser` installs it).
test: venv browser lint typecheck
	PATH="$(CURDIR)/$(SAM_VENV)/bin:$$PATH" $(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not slow and not stack"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy shared/vap_shared functions/ingest/ingest.py functions/webhook/webhook.py functions/sweeper/sweeper.py functions/store/store.py gpu local_stack vap_cli bench

validate: venv
	$(BIN)/cfn-lint template.yaml
	SAM_CLI_TELEMETRY=0 $(SAM_VENV)/bin/sam validate --lint -t template.yaml --region us-east-1

# The Lambda layer for arm64/python3.13 without sam build (pip's cross-platform wheels), then the
# checks Lambda's loader implies; `make deploy` deploys this build. Also run by `make test`.
layer: $(STAMP)
	$(BIN)/python -m vap_cli.layer

# Parity of gpu/vap with the reference implementation (CPU, ~1 min); writes the Result section of
# docs/parity.md. Downloads nothing: VAP_REFERENCE names a checkout or git mirror of
# bytedance/Video-As-Prompt already on this machine (default .local/vap-reference).
parity: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m gpu.tools.parity.check_reference \
		$(if $(VAP_REFERENCE),--reference "$(VAP_REFERENCE)") --write docs/parity.md

# A GPU's first contact (docs/gpu-benchmarks.md): on any machine with a CUDA GPU and PyTorch, offline,
# at most 9 minutes on one H100/H200; prints as it goes and writes docs/gpu-benchmarks.md. It installs
# nothing but the wheels of .whl/ (what GPU_PY lacks of requirements/gpu-check*.txt, into
# .local/gpu-check/site; the machine's torch is used), which `make gpu-wheels` downloads where the
# package registry is reachable (for CPython 3.12 on manylinux x86_64). No venv involved: GPU_PY is
# the Python that has torch. Without CUDA it runs the CPU path (tiny shapes), as `make test` does.
GPU_PY ?= python3
GPU_SITE := .local/gpu-check/site
gpu-check:
	$(GPU_PY) -m gpu.tools.wheels install --target $(GPU_SITE)
	PYTHONPATH="$(CURDIR)/$(GPU_SITE):$(CURDIR):$(CURDIR)/shared" HF_HUB_OFFLINE=1 \
		$(GPU_PY) -m gpu.tools.check --write docs/gpu-benchmarks.md

gpu-wheels:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(GPU_PY)) -m gpu.tools.wheels download

# Deploy: Modal app (weights checked) + the AWS stack wired to it, one command (README "Deploy"):
#   make deploy STACK=vap [REGION=… PROFILE=…] [JOB_BUDGET_S=9000 MODAL_CONTAINERS=2
#       FAL_MAX_OUTSTANDING=20] [DOWNLOAD_WEIGHTS=1] [DEPLOY_ARGS="--parameter DefaultBackend=fal"]
#   (DEPLOY_ARGS reaches the shell as written: quote a value with spaces, "--parameter 'K=a b'".)
AWS_ARGS = $(if $(REGION),--region "$(REGION)") $(if $(PROFILE),--profile "$(PROFILE)")
deploy: venv
	$(if $(STACK),,$(error make deploy needs STACK=<stack name>))
	PATH="$(CURDIR)/$(BIN):$(CURDIR)/$(SAM_VENV)/bin:$$PATH" $(BIN)/python -m vap_cli.deploy \
		--stack "$(STACK)" $(AWS_ARGS) \
		$(if $(JOB_BUDGET_S),--job-budget-s $(JOB_BUDGET_S)) \
		$(if $(MODAL_CONTAINERS),--modal-containers $(MODAL_CONTAINERS)) \
		$(if $(FAL_MAX_OUTSTANDING),--fal-max-outstanding $(FAL_MAX_OUTSTANDING)) \
		$(if $(DOWNLOAD_WEIGHTS),--download-weights) $(DEPLOY_ARGS)

# One small job through a deployed stack (STACK=…) or the local one (`make local`): pass/fail report.
smoke: $(STAMP)
	$(BIN)/python -m vap_cli.smoke $(if $(STACK),--stack "$(STACK)") $(AWS_ARGS) $(SMOKE_ARGS)

# Runs the local stack until interrupted; writes .local/stack.json when ready.
local: $(STAMP)
	$(BIN)/python -m local_stack

# Sets up, starts the local stack, runs one sample job, prints the notification and the MP4 path.
demo: $(STAMP)
	$(BIN)/python -m local_stack.demo

# Orchestration benchmarks: cold starts (python3.13: pyenv 3.13.0 or $$VAP_BENCH_PYTHON313),
# 200 jobs on the local stack, a 500 MiB output, cost per video; prints the table and writes
# docs/benchmarks.md. Options: make bench BENCH_ARGS="--jobs 20 --size-mb 50 --no-write".
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The README's gallery picture: the demo's jobs on the local stack, `vap gallery`, headless Chromium.
gallery-screenshot: $(STAMP) browser
	$(BIN)/python -m vap_cli.gallery_shot

# Keeps .local/vap-reference (make parity's reference checkout: it is never downloaded by make).
clean:
	find .local -mindepth 1 -maxdepth 1 ! -name vap-reference -exec rm -rf {} + 2>/dev/null || true
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache
