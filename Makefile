# Two commands a new machine needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
SAM_VENV := .venv-sam
SAM_STAMP := $(SAM_VENV)/.installed
# The console's browser tests drive the operating system's Chromium (Playwright cannot download one here).
CHROMIUM := /usr/bin/chromium

.PHONY: venv test test-fast demo bench lint clean prereqs gpu-wheels image-pin image-check

# What this machine lacks for the goal asked (local/prereqs.sh), in one line, before anything installs.
prereqs:
	@PYTHON="$(PYTHON)" CHROMIUM="$(CHROMIUM)" sh local/prereqs.sh $(if $(filter test,$(MAKECMDGOALS)),test,demo)

venv: $(STAMP)

# Re-installs only when the pins or the project metadata change (idempotent).
$(STAMP): requirements.lock pyproject.toml | prereqs
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# checkov pins boto3 1.35, which conflicts with ours: it gets a virtualenv of its own.
$(CHECKOV_STAMP): requirements-checkov.lock | prereqs
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.lock
	touch $(CHECKOV_STAMP)

# aws-sam-cli (sam build) and aws-sam-translator (the SAM transform the lint and the permission
# tests read) pin pydantic below ours: a virtualenv of their own too.
$(SAM_STAMP): requirements-sam.lock | prereqs
	test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-sam.lock
	touch $(SAM_STAMP)

$(CHROMIUM): | prereqs
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium fonts-dejavu-core


test: $(STAMP) $(CHECKOV_STAMP) $(SAM_STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q

test-fast: $(STAMP) $(SAM_STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/python -m local.demo

bench: $(STAMP)
	$(VENV)/bin/python bench/api.py
	$(VENV)/bin/python bench/train.py
	$(VENV)/bin/python bench/contract.py

# The wheels bench/gpu.sh unpacks where pydantic is missing (docs/gpu.md).
gpu-wheels: $(STAMP)
	$(VENV)/bin/python bench/deps.py fetch

# The source as written, then what CloudFormation gets: the template after the SAM transform
# (cycles, runtimes and the generated roles exist only there). W2001 is left out there alone:
# the transform inlines parameter values, as CloudFormation's does with the deployed ones.
lint: $(STAMP) $(SAM_STAMP)
	$(VENV)/bin/cfn-lint template.yaml
	$(SAM_VENV)/bin/python -m local.sam build/template.json
	$(SAM_VENV)/bin/cfn-lint --ignore-checks W2001 -- build/template.json

# The training image's base by digest (local/base_image.py; docker and the network): pin writes the
# tag's digest into training_image/Dockerfile, check fails when that digest is gone from the
# registry or the tag has moved.
image-pin: $(STAMP)
	$(VENV)/bin/python -m local.base_image pin

image-check: $(STAMP)
	$(VENV)/bin/python -m local.base_image check

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(SAM_VENV) .pytest_cache
