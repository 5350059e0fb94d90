#!/usr/bin/env bash
# The CPU test suite of the packages the GPU machine runs under its versions (jax 0.11.2,
# flax 0.12.10, orbax-checkpoint 0.12.4: older than what `make test` resolves), so an API that
# only the newer versions have is caught here, not in the GPU session's few minutes.
#   bash scripts/check_gpu_versions.sh [pytest args]     (default: the kernel, nn, model and
#                                                         checkpoint tests; ~17 min on 2 cores)
# The virtual environment lives outside the repository ($MEMX_GPU_VERSIONS_VENV, default
# /tmp/memx-venv-gpu-versions) and is reused between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEMX_GPU_VERSIONS_VENV:-/tmp/memx-venv-gpu-versions}
if [ ! -x "$VENV/bin/python" ]; then
  "$(scripts/find_python.sh)" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "jax==0.11.2" "jaxlib==0.11.2" "flax==0.12.10" \
      "orbax-checkpoint==0.12.4" optax chex einops jaxtyping numpy scipy tqdm pytest hypothesis
fi
"$VENV/bin/python" -c "import jax, flax, orbax.checkpoint as o; \
print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__)"
# A compile cache of its own: entries of another jax version must not be read back.
if [ $# -eq 0 ]; then set -- tests/kernels tests/nn tests/models tests/checkpoint; fi
MEMX_TEST_CACHE=/tmp/memx-test-xla-cache-gpu-versions PYTHONPATH="$PWD" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
