#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with pinned torch/torchvision, Open MPI, mpi4py,
# Horovod 0.28.1 built from source (C++ standard fix) with PyTorch + MPI + Gloo, and this package.
# Usage: scripts/setup.sh            (VENV=.venv by default)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
HOROVOD_VERSION=0.28.1
CACHE=${HOROVOD_DPSGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod-dpsgd}
SDIST="$CACHE/horovod-$HOROVOD_VERSION.tar.gz"   # Horovod's source distribution, downloaded once
STEP="start"
trap 'echo "setup.sh: FAILED at step: $STEP (see the output above; re-run make setup after fixing it)" >&2' ERR

log() { echo "==> [setup] $*"; }

# 1. MPI: Debian's Open MPI 4.1 is the MPI with which plain `horovodrun -np N` works unchanged.
STEP="install Open MPI (apt-get install openmpi-bin libopenmpi-dev)"
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
            echo "setup.sh: Open MPI is missing and this user cannot install it. Ask an administrator to run:" >&2
            echo "  apt-get install -y openmpi-bin libopenmpi-dev" >&2
            exit 1
        fi
    fi
    log "installing Open MPI from Debian packages"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
MPI_VERSION=$(mpirun --version 2>/dev/null | head -n1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1)
log "MPI: $(mpirun --version 2>/dev/null | head -n1)"

# 2. Virtual environment and pinned Python dependencies.
STEP="create virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

# What Horovod's build needs first; everything else comes from pyproject.toml in step 4.
STEP="install torch, torchvision and mpi4py (constraints.txt)"
if ! $PY -c "import torch, torchvision, mpi4py, cmake, packaging" >/dev/null 2>&1; then
    log "installing torch, torchvision, mpi4py (a few minutes the first time)"
    $PIP install -q -U pip wheel "setuptools<81"
    $PIP install -q -c "$ROOT/constraints.txt" torch torchvision mpi4py numpy "cmake<4" packaging
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
PY_TAG=$($PY -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")

# 3. Horovod from its source distribution, patched for the C++ standard torch's headers need.
STEP="build Horovod $HOROVOD_VERSION from source"
CHECK=$("$VENV/bin/horovodrun" --check-build 2>/dev/null || true)
if ! echo "$CHECK" | grep -q "\[X\] PyTorch"; then
    WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PY_TAG-ompi$MPI_VERSION"
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION wheel (about 3-5 minutes on 2 cores; cached in $WHEEL_DIR)"
        BUILD=$(mktemp -d)
        if [ ! -f "$SDIST" ]; then
            mkdir -p "$CACHE"
            $PIP download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
            mv "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" "$SDIST"
        fi
        tar -xzf "$SDIST" -C "$BUILD"
        SRC="$BUILD/horovod-$HOROVOD_VERSION"
        # torch >= 2.14 headers use C++20 (std::strong_ordering); torch 2.1..2.13 need C++17.
        CXXSTD=$($PY -c "import torch; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print(20 if v >= (2, 14) else 17)")
        sed -i -E "s/CMAKE_CXX_STANDARD [0-9]+/CMAKE_CXX_STANDARD $CXXSTD/" "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
        # A CUDA build of torch makes Horovod's CMake look for the CUDA toolkit.
        if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
            NVCC=$(command -v nvcc)
            if head -c 2 "$NVCC" | grep -q '#!'; then
                NVCC_REAL=$(grep -oE '/[^ "]*/bin/nvcc' "$NVCC" | head -n1 || true)
                [ -n "$NVCC_REAL" ] && NVCC=$NVCC_REAL
            fi
            export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
        fi
        if [ -n "${CUDA_HOME:-}" ]; then export CUDAToolkit_ROOT=$CUDA_HOME; log "CUDA toolkit: $CUDA_HOME"; fi
        mkdir -p "$WHEEL_DIR"
        ( cd "$SRC" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
            HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(nproc)" \
            PATH="$VENV/bin:$PATH" $PIP wheel --no-build-isolation --no-deps . -w "$WHEEL_DIR" > "$BUILD/build.log" 2>&1 ) \
            || { tail -n 40 "$BUILD/build.log" >&2; false; }
        rm -rf "$BUILD"
    fi
    log "installing cached Horovod wheel from $WHEEL_DIR"
    $PIP install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
    $PIP install -q cloudpickle psutil pyyaml packaging cffi
    CHECK=$("$VENV/bin/horovodrun" --check-build)
fi

# 3b. Horovod's own PyTorch examples (not committed here), for tests/integration/test_horovod_examples.py; see the script.
STEP="install Horovod $HOROVOD_VERSION's examples (scripts/horovod_examples.sh)"
bash "$ROOT/scripts/horovod_examples.sh" "$PY" "$SDIST" "$VENV/share/horovod-$HOROVOD_VERSION"

# 4. This package, editable, with the research toolkit and the test tools (its extras).
STEP="install horovod-dpsgd (pip install -e '.[experiments,test]')"
$PIP install -q -c "$ROOT/constraints.txt" --no-build-isolation -e "$ROOT[experiments,test]"

# 5. Verify.
STEP="verify Horovod build (horovodrun --check-build must list PyTorch and MPI)"
echo "$CHECK" | grep -q "\[X\] PyTorch" && echo "$CHECK" | grep -q "\[X\] MPI"
log "ready: $("$VENV/bin/python" -c 'import horovod, torch, torchvision, mpi4py; print(f"horovod {horovod.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, mpi4py {mpi4py.__version__}")')"
