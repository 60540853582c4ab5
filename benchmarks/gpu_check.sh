#!/usr/bin/env bash
# One prepared GPU run for benchmarks/README.md: random weights, generated data, nothing downloaded but missing
# packages. From a clean clone on a GPU machine:
#   bash benchmarks/gpu_check.sh                # writes $OUT/gpu_check.json + gpu_check.log (OUT=outputs/gpu_check)
#   bash benchmarks/gpu_check.sh --cpu-smoke    # every step at toy size on the CPU (checks the script, ~3 min)
#   python benchmarks/gpu_check.py report $OUT/gpu_check.json   # the README tables
# 1. no GPU (nvidia-smi lists none): one line, exit 3, before anything is installed;
# 2. Python: $PY, else .venv/bin/python, else a new .venv over python3's packages (--system-site-packages: the
#    machine's CUDA torch is kept); the pyproject dependencies it lacks are installed with the pinned versions of
#    requirements/constraints.txt (as `make install`; torch and its CUDA libraries are left as they are; WHEELS=DIR
#    installs from a folder of wheels, offline); what cannot be installed is named in one line, exit 4;
# 3. the steps of benchmarks/gpu_check.py, each killed past its budget (8 min in all on one H100/H200):
#    generate the data once (outputs/gpu_check_data), PixelCLIP ViT-B/16 step fp32/bf16 by part, data wait with
#    4/8/12 workers on the shipped data path, MaskCLIP ViT-B/16 images/s per protocol. Exit 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
SMOKE=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=(--cpu-smoke) ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (--cpu-smoke, --help)" >&2; exit 2 ;;
  esac
done

if [ ${#SMOKE[@]} = 0 ] && ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "gpu_check: no GPU found (nvidia-smi lists none); bash benchmarks/gpu_check.sh --cpu-smoke dry-runs every step on the CPU" >&2
  exit 3
fi

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  else
    python3 -m venv --system-site-packages .venv >/dev/null 2>&1 || { echo "gpu_check: cannot create .venv with python3 -m venv" >&2; exit 4; }
    PY=.venv/bin/python
    # python3 may itself be a venv (the CUDA images' /opt/torch/.venv): --system-site-packages then reaches its
    # base interpreter's packages, not python3's, so its site-packages (its CUDA torch) are added by a .pth file
    python3 -c "import site; print('\n'.join(site.getsitepackages()))" \
      > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_check_machine_site.pth"
  fi
fi
missing=$("$PY" benchmarks/gpu_check.py missing 2>/dev/null) || { echo "gpu_check: $PY does not run benchmarks/gpu_check.py" >&2; exit 4; }
if [ -n "$missing" ] && [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  echo "gpu_check: installing $missing (pinned by requirements/constraints.txt)"
  constraints=$(mktemp)
  if "$PY" -c "import torch" 2>/dev/null; then  # the machine's torch stays
    grep -Ev '^(torch|torchvision|triton|nvidia-|cuda-)' requirements/constraints.txt > "$constraints"
  else
    cp requirements/constraints.txt "$constraints"
  fi
  if [ -n "${WHEELS:-}" ]; then
    # offline: every wheel of the folder, as it is (the missing distributions and theirs, downloaded for this
    # machine's Python: benchmarks/README.md); no resolution against the machine's packages, which stay
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl >/dev/null 2>&1
  else
    set -f  # "jsonargparse[signatures]>=4.32" is not a glob
    # shellcheck disable=SC2086  # one argument per requirement
    "$PY" -m pip install -q -c "$constraints" $missing >/dev/null 2>&1
    set +f
  fi
  rm -f "$constraints"
  missing=$("$PY" benchmarks/gpu_check.py missing 2>/dev/null)
fi
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks $missing (pip could not install them: offline? WHEELS=DIR installs from wheels)" >&2
  exit 4
fi
exec "$PY" benchmarks/gpu_check.py run "${SMOKE[@]}"
