# The two set-up commands of README.md: `make demo` (the main job on the demo model) and
# `make test` (the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sllm-installed

.PHONY: demo test fuzz man clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch when none is there (a bare `pip install torch` pulls several GB of CUDA).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sllm.demo

test: $(STAMP)
	$(PY) -m pytest -q

# schemathesis against a real `sllm serve` on a tiny model: fails on any 500 or schema violation.
fuzz: $(STAMP)
	$(PY) tools/schema_fuzz.py --max-examples 10 --seconds 90

man: $(STAMP)
	$(PY) tools/gen_man.py

clean:
	rm -rf $(VENV) demo-out
