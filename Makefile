# tabgpt: every target does its own set-up (system packages, .venv, npm runtime) on a fresh Debian machine.
PY      := .venv/bin/python
PORT    ?= 8000
STAMPS  := .cache/stamps
export NO_MKDOCS_2_WARNING := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system demo site test test-fast train bench clean

setup: $(STAMPS)/system $(STAMPS)/venv $(STAMPS)/npm

$(STAMPS)/system: build/setup_system.sh
	bash build/setup_system.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# PyTorch (CPU) and transformers: references for the kernel and checkpoint tests only.
	$(PY) -m pip install -q torch==2.13.0 transformers==5.25.0
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/npm: build/package.json build/package-lock.json
	npm ci --prefix build --no-audit --no-fund
	@mkdir -p $(STAMPS) && touch $@

# The static site: the blog (mkdocs) and beside it the runtime bundle (Pyodide, micropip, our wheel, shaders).
site: setup
	$(PY) -m mkdocs build -q
	$(PY) build/bundle.py

demo: site
	$(PY) build/serve.py --port $(PORT)

# Every test on lavapipe and in Chromium, then the native (non-browser) tests again on SwiftShader, the CPU Vulkan
# driver that ships with Chromium (what browsers without a GPU run WebGPU on: no shader-f16, subgroups of 4 lanes).
test: setup site
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests
	TABGPT_TEST_ADAPTER=swiftshader $(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m "not browser" tests

test-fast: setup
	$(PY) -m pytest -q -m "not browser" tests

# Train natively on the default corpus, then sample and evaluate: `make train PRESET=browser ARGS="--max-steps 500"`.
PRESET  ?= small
ARGS    ?=
train: setup
	$(PY) -m tabgpt train --data default --preset $(PRESET) --out runs/$(PRESET)-$$(date +%Y%m%d-%H%M%S) $(ARGS)

clean:
	rm -rf dist .cache/stamps
