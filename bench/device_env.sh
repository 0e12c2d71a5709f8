# Source this on a GPU machine that has the repo but no pip install of fastdm (e.g. the lent device machine):
# it exposes the repo as the `fastdm` package through a link tree and uses a prebuilt kernel library.
#   . bench/device_env.sh && python -m pytest -m gpu tests
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_site="${FASTDM_SITE:-/tmp/fastdm_site}"
mkdir -p "$_site/fastdm"
for _d in runtime models kernels tokenizers_cfg scripts; do ln -sfn "$_repo/$_d" "$_site/fastdm/$_d"; done
cp "$_repo/fastdm/__init__.py" "$_site/fastdm/__init__.py"
export PYTHONPATH="$_site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
