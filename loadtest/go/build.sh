#!/usr/bin/env bash
# Builds loadtest/go/gowatch (etcd's clientv3 watchers driven by loadgen) into OUT, offline,
# in GOPATH mode against Debian's packaged Go sources:
#   apt-get install -y golang-go golang-etcd-server-dev
#   bash loadtest/go/build.sh /tmp/gowatch
# The binary is never committed; loadgen runs this script itself for --go-client unless
# --go-bin names a binary built before.
set -euo pipefail
out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
export GO111MODULE=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode"
# The build cache makes rebuilds take seconds; it is Go's cache, not an artifact.
export GOCACHE=${GOCACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/go-build}
cd "$here/gowatch"
go build -o "$out" .
