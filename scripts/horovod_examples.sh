#!/usr/bin/env bash
# Install Horovod's own PyTorch examples into DEST (scripts/setup.sh: $VENV/share/horovod-VERSION), for
# tests/integration/test_horovod_examples.py, which runs them with the one-line swap to horovod_dpsgd.DistributedOptimizer.
#
# They are Horovod's files (Apache-2.0) and are not committed to this repository. Each is checked against
# tests/support/horovod_examples.sha256 (the files at Horovod's tag v0.28.1), taken from the first source that has them all:
#   1. $HOROVOD_SOURCE: a copy of Horovod's repository at tag v0.28.1 (or any folder with its examples/ and LICENSE);
#   2. Horovod's source distribution (SDIST, downloaded if missing), when it carries examples/ (0.28.1's does not);
#   3. shared/third_party/horovod-VERSION inside or beside this checkout.
# Exits 0 either way; without a source it says what the tests need. Idempotent: nothing is done if DEST is complete.
# Usage: scripts/horovod_examples.sh PYTHON SDIST DEST
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$1 SDIST=$2 DEST=$3
VERSION=0.28.1
SUMS="$ROOT/tests/support/horovod_examples.sha256"

complete() { [ -d "$1" ] && (cd "$1" && sha256sum --quiet --check "$SUMS") >/dev/null 2>&1; }

if complete "$DEST"; then
    exit 0
fi
if [ ! -f "$SDIST" ]; then
    mkdir -p "$(dirname "$SDIST")"
    TMP=$(mktemp -d)
    "$PY" -m pip --disable-pip-version-check download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$TMP" \
        && mv "$TMP/horovod-$VERSION.tar.gz" "$SDIST" || echo "horovod_examples.sh: could not download Horovod's source distribution" >&2
    rm -rf "$TMP"
fi
UNPACKED=$(mktemp -d)
trap 'rm -rf "$UNPACKED"' EXIT
if [ -f "$SDIST" ]; then
    tar -xzf "$SDIST" -C "$UNPACKED" "horovod-$VERSION/examples" "horovod-$VERSION/LICENSE" 2>/dev/null || true
fi
for SRC in ${HOROVOD_SOURCE:+"$HOROVOD_SOURCE"} "$UNPACKED/horovod-$VERSION" \
           "$ROOT/shared/third_party/horovod-$VERSION" "$ROOT/../shared/third_party/horovod-$VERSION"; do
    if complete "$SRC"; then
        rm -rf "$DEST"
        while read -r _ path; do
            install -D -m 644 "$SRC/$path" "$DEST/$path"
        done < "$SUMS"
        echo "==> [setup] Horovod $VERSION's examples: $SRC -> $DEST"
        exit 0
    fi
done
echo "==> [setup] NOTE: Horovod $VERSION's examples are not installed: its source distribution does not ship them." \
     "tests/integration/test_horovod_examples.py fails until they are; run again with HOROVOD_SOURCE=<a copy of Horovod's" \
     "repository at tag v$VERSION> (see docs/horovod_examples.md)" >&2
