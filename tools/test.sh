#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite. Extra arguments go to
# pytest, e.g. `tools/test.sh -k writer -x`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/tools/setup.sh"
export APT_LAYER_COMPOSEFS_BIN="$repo/.upstream/composefs-1.0.8/bin"
export PATH="$repo/.venv/bin:$PATH"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
