# Source this on a GPU machine that has the source tree but no pip install of fastdm (e.g. the lent device
# machine): the checkout itself is importable as `fastdm` (see fastdm/__init__.py) and the prebuilt kernel
# library is read from kernels/libfastdm_kernels.so.
#   . bench/device_env.sh && python -m pytest -m gpu tests
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
