#!/usr/bin/env bash
# Builds a Kubernetes API server for the operator's tests into $1 (a binary path): the
# apiextensions API server (main.go beside this script) from the Go sources Debian sid carries
# (Debian's stable releases do not), in GOPATH mode, with nothing installed system-wide. The
# packages (about 320 MB) are fetched with a private apt configuration into a cache next to
# the binary and kept, so a rebuild fetches nothing. About 4 minutes on 2 cores. Everything the
# build writes, Go's temporary files included, stays under that cache (a machine's /tmp may be
# small), and the 4 GB of unpacked sources and build cache are removed once the binary exists.
set -euo pipefail
out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(dirname "$out")/kube-apiserver-build"
mkdir -p "$work"/{apt/lists/partial,apt/cache/archives/partial,debs,root,overlay/src,gopath/src/kube-apiserver,tmp}

for needed in apt-get apt-cache dpkg; do
    if ! command -v "$needed" >/dev/null 2>&1; then
        echo "building kube-apiserver needs Debian's $needed; or set KUBE_APISERVER_BIN" >&2
        exit 1
    fi
done

# The machine's own Debian mirror, at sid.
mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list.d/*.list 2>/dev/null | grep -E '^(URIs:|deb )' \
    | grep -oE 'https?://[^ ]+' | grep -v security | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} sid main" \
    > "$work/apt/sources.list"
apt=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
    -o Dir::State::status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root)
wanted=(golang-k8s-apiextensions-apiserver-dev golang-k8s-client-go-dev golang-1.27-go)

if [ ! -e "$work/root/.extracted" ]; then
    echo "fetching the Go sources of the Kubernetes API server from Debian sid ($mirror)" >&2
    apt-get "${apt[@]}" -qq update
    # Every Go package the sources need, and the toolchain; no C library is built.
    mapfile -t packages < <(apt-cache "${apt[@]}" depends --recurse --no-recommends \
        --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances "${wanted[@]}" \
        | grep -E '^golang' | sort -u)
    (cd "$work/debs" && apt-get "${apt[@]}" -qq download "${packages[@]}")
    for deb in "$work"/debs/*.deb; do
        dpkg -x "$deb" "$work/root"
    done
    touch "$work/root/.extracted"
fi

# Modules of a major version above 1 are imported as .../vN but unpacked without the suffix:
# link each under its module path, in a GOPATH entry of its own.
gocode="$work/root/usr/share/gocode"
while IFS= read -r mod; do
    dir="$(dirname "$mod")"
    module="$(sed -nE 's/^module[[:space:]]+"?([^"[:space:]]+)"?.*/\1/p' "$mod" | head -n1)"
    rel="${dir#"$gocode"/src/}"
    if [ -n "$module" ] && [ "$rel" != "$module" ] && [ ! -e "$work/overlay/src/$module" ]; then
        mkdir -p "$(dirname "$work/overlay/src/$module")"
        ln -s "$dir" "$work/overlay/src/$module"
    fi
done < <(find "$gocode/src" -name go.mod)

cp "$here/main.go" "$work/gopath/src/kube-apiserver/main.go"
export GOROOT="$work/root/usr/lib/go-1.27" GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local \
    CGO_ENABLED=0 GOPATH="$work/gopath:$work/overlay:$gocode" GOCACHE="$work/gocache" \
    GOTMPDIR="$work/tmp" TMPDIR="$work/tmp"
echo "building kube-apiserver (go $("$GOROOT/bin/go" env GOVERSION))" >&2
(cd "$work/gopath/src/kube-apiserver" && "$GOROOT/bin/go" build -o "$out" .)
rm -rf "$work/root" "$work/gocache" "$work/tmp" "$work/overlay"
