#!/usr/bin/env bash
# ONE command for the main job on a fresh machine: set up, then `dvc repro` on the default params.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
dvc repro "$@"
dvc metrics show
