# ovseg — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
TOY ?= data/toyworld
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help install demo demo-tiny demo-ui test test-full test-ddp test-demo bench gpu-wheels parity lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

# torch + torchvision first, as a matching pair (PyPI's torchvision does not import beside a CPU-only torch)
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	@set -e; start=$$(date +%s); \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 -c requirements/constraints.txt; \
	$(PY) -m pip install -q -e '.[dev,hf,wandb,rich,sam,tar,dino]' -c requirements/constraints.txt; \
	touch $@; echo "[install] $$(( $$(date +%s) - start )) s"

install: $(VENV)/.installed  ## create .venv and install ovseg with pinned dependencies

# toyworld.json is written last: its presence means a complete world
$(TOY)/toyworld.json: | $(VENV)/.installed
	@set -e; start=$$(date +%s); $(VENV)/bin/ovseg toyworld generate --root $(TOY); \
	echo "[demo] generate: $$(( $$(date +%s) - start )) s"

demo: $(VENV)/.installed $(TOY)/toyworld.json  ## install, generate the toy world, the toy leaderboard (zero-shot, fine-tuned, 4-fold), predictions.png
	@set -e; start=$$(date +%s); $(VENV)/bin/ovseg toyworld leaderboard --root $(TOY) --out outputs/toyworld_leaderboard \
	  --folds -- --trainer.enable_progress_bar false; \
	echo "[demo] leaderboard: $$(( $$(date +%s) - start )) s"

# `ovseg demo` needs Gradio, installed beside the pins without resolving (requirements/demo.txt says why)
$(VENV)/.demo-installed: $(VENV)/.installed requirements/demo.txt
	$(PY) -m pip install -q --no-deps -r requirements/demo.txt
	touch $@

# a dozen toy val images for the page's list
$(TOY)/demo_images/.done: $(TOY)/toyworld.json
	@set -e; mkdir -p $(@D); for id in $$(head -12 $(TOY)/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt); do \
	  cp $(TOY)/VOCdevkit/VOC2012/JPEGImages/$$id.jpg $(@D)/; done; touch $@

# the training-free methods with the shipped toy CLIP; PixelCLIP and CLIP-S4 too once `make demo` has trained them
DEMO_UI_METHODS := $(foreach m,clip maskclip sclip naclip,--config configs/toyworld/$(m).yaml) \
  $(foreach m,pixelclip clips4,$(if $(wildcard outputs/toyworld_leaderboard/$(m)/fit/checkpoints/last.ckpt),\
    --config configs/toyworld/$(m).yaml --ckpt_path outputs/toyworld_leaderboard/$(m)/fit/checkpoints/last.ckpt))
HOST ?= 127.0.0.1
PORT ?= 7860
demo-ui: $(VENV)/.demo-installed $(TOY)/demo_images/.done  ## the web page (ovseg demo) on the toy world: toy CLIP, toy images, its words; offline, CPU (GPU when present)
	$(VENV)/bin/ovseg demo $(DEMO_UI_METHODS) --images $(TOY)/demo_images --classes toyworld --host $(HOST) --port $(PORT)

# chromium + chromium-driver from Debian (apt; nothing downloads a browser build), selenium (dev extra), Gradio
test-demo: $(VENV)/.demo-installed  ## ovseg demo's tests, the browser one included (installs Debian's chromium and chromium-driver)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	  else sudo apt-get update -q && sudo apt-get install -y -q --no-install-recommends chromium chromium-driver; fi; }
	$(PY) -m pytest -q -m "" tests/unit/test_demo.py tests/integration/test_demo_browser.py

$(DATA)/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt: | $(VENV)/.installed
	$(VENV)/bin/ovseg data synth --root $(DATA) --datasets voc21 --num-images 8 --min-size 96 --max-size 160

demo-tiny: $(VENV)/.installed $(DATA)/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt  ## a 1-minute smoke run: synthetic VOC, MaskCLIP with a tiny random CLIP
	$(VENV)/bin/ovseg test --config configs/tiny/maskclip.yaml --data.root $(DATA) --data.datasets '[voc21,voc20]'

test: $(VENV)/.installed  ## fast tests (not slow), DDP equivalence included
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

test-full: $(VENV)/.installed  ## every test, slow ones included
	$(PY) -m pytest -q -m ""; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: $(VENV)/.installed  ## inference throughput / memory benchmark (numbers in benchmarks/README.md)
	$(PY) benchmarks/bench_inference.py

# wheels of what a GPU image lacks, for its Python (GPU_PYTHON), for `WHEELS=.whl bash benchmarks/gpu_check.sh` offline
GPU_PYTHON ?= 3.12
gpu-wheels: $(VENV)/.installed  ## download into .whl/ the wheels benchmarks/gpu_check.sh needs on the lent GPU image (no network there)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p)) \
	  -d .whl -c requirements/constraints.txt -r requirements/gpu-image-missing.txt

# REFS: a folder with checkouts of the authors' code (git clone https://github.com/cvlab-kaist/PixelCLIP, …/chongzhou96/MaskCLIP,
# …/wangf3014/SCLIP, …/sinahmr/NACLIP, …/mc-lan/ClearCLIP, …/yvhangyang/ResCLIP, …/SuleBai/SC-CLIP, …/mc-lan/ProxyCLIP,
# …/YuHengsss/Trident, …/m-arda-aydn/ITACLIP, …/leaves162/CLIPtrase, …/vladan-stojnic/LPOSS, …/twke18/HSG,
# facebookresearch/dino); the ones present are compared, the others skipped.
# REF=NACLIP compares that reference only. OUT: the folder of PARITY.md / parity.json (default outputs/parity, not
# tracked); OUT=benchmarks regenerates the committed record, then benchmarks/RESULTS.md (what maintainers commit).
# Peak memory (CPU, ViT-B/16): PixelCLIP up to 15.4 GB, MaskCLIP about 4 GB (README.md, "Parity with the authors' code").
REFS ?= ../refs
REF ?= PixelCLIP MaskCLIP SCLIP NACLIP ClearCLIP ResCLIP SC-CLIP ProxyCLIP Trident ITACLIP CLIPtrase LPOSS HSG DINO
OUT ?= outputs/parity
PARITY_REFS := $(foreach r,$(REF),$(if $(wildcard $(REFS)/$(r)),--ref $(r)=$(REFS)/$(r)))
parity: $(VENV)/.installed  ## parity with the authors' code (REFS=checkouts, REF=one of them, OUT=folder; OUT=benchmarks: the committed record)
	@test -n "$(PARITY_REFS)" || { echo "no checkout of $(REF) under REFS=$(REFS) (see the Makefile comment above this target)"; exit 1; }
	$(PY) -m pip install -q -e '.[parity]' -c requirements/constraints.txt
	test -f $(VENV)/mmcv1/mmcv/__init__.py || PIP_CONSTRAINT=$(CURDIR)/requirements/setuptools-lt70.txt MMCV_WITH_OPS=0 \
		$(PY) -m pip install -q --no-deps --target $(VENV)/mmcv1 mmcv==1.7.2
	$(VENV)/bin/ovseg parity $(PARITY_REFS) --out $(OUT)
	@if [ "$(OUT)" = benchmarks ]; then $(VENV)/bin/ovseg bench report --out benchmarks; \
	else echo "parity record in $(OUT) (benchmarks/ untouched; OUT=benchmarks regenerates the committed one)"; fi

lint: $(VENV)/.installed  ## ruff
	$(VENV)/bin/ruff check ovseg tests benchmarks

clean:  ## remove outputs and the generated demo data (keeps .venv)
	rm -rf outputs $(DATA) $(TOY)
