#!/usr/bin/env bash
# Install deltagrad-ray on a cluster node or into an image: the way scripts/dev.sh does it
# (pip -c constraints.txt -e .), except for torch.
#
# constraints.txt pins torch==X+cpu, the small CPU wheel CI resolves; GPU nodes need the CUDA
# build of the same version. pyproject.toml only asks for torch>=2.4,<2.14, so this script
# installs torch==X first (on Linux x86_64 the PyPI wheel is the CUDA build; set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only node) and then installs
# the project under every other pin of constraints.txt.
#
#   bash infra/install.sh [extra pip arguments]
#
# Environment: PIP (default "python -m pip"), TORCH_INDEX_URL (default: PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-python -m pip}
torch_version=$(sed -n 's/^torch==\([^+]*\).*$/\1/p' constraints.txt)
if [ -z "$torch_version" ]; then
    echo "install.sh: no torch==VERSION line in constraints.txt" >&2
    exit 2
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' constraints.txt > "$constraints"

torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_index=(--index-url "$TORCH_INDEX_URL")
fi
$PIP install --no-cache-dir "${torch_index[@]}" "torch==$torch_version"
$PIP install --no-cache-dir -c "$constraints" -e . "$@"
