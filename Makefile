# qcore: `make demo` installs everything and runs the main job; `make test` runs every test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PLUGINS := $(sort $(wildcard plugins/qcore_*))
STAMP   := $(VENV)/.qcore-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e '.[demo,test,plot]' $(foreach p,$(PLUGINS),-e $(p))
	touch $@

demo: install
	$(VENV)/bin/qcore quantize smollm2-135m --method gptq --bits 4 --group-size 64 \
		--out out/smollm2-135m-gptq-w4g64 --eval

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
