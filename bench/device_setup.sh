# Sourced from the repository root on the device machine, by `python3 -m bench call NAME` (each call names its mode)
# or by hand before other commands:
#     source bench/device_setup.sh package || exit 1    # or: checkout
# Installs the wheels carried in .whl/ (what the machine's image lacks) into /tmp/site and makes $OUT (default
# /tmp/out). `package` also installs this project (the Hydra app finds its configs through the installed package)
# and puts only /tmp/site on PYTHONPATH; `checkout` puts the checkout itself there too.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
if [[ $1 == package ]]; then
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation . || return 1
else
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
