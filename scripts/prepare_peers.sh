#!/usr/bin/env bash
# Run on the development machine (which has ../shared and a package registry) before sending the
# checkout to the GPU machine: fills the git-ignored .peers/ folder that scripts/gpu_suite.sh
# unpacks there. Name `.peers` in the device call's `carry`.
#   bash scripts/prepare_peers.sh [SHARED_PEERS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/peers}
mkdir -p .peers
cp -f "$SRC"/*.tar.gz "$SRC"/*.whl .peers/ 2>/dev/null || { echo "no peer archives found in $SRC" >&2; exit 1; }
# mamba_ssm's Triton ops and fla import einops, which the GPU machine may lack (it cannot download).
if ! ls .peers/einops-*.whl >/dev/null 2>&1; then
    python -m pip download --no-deps --only-binary=:all: -d .peers einops || echo "warning: could not fetch einops" >&2
fi
ls -la .peers
