#!/usr/bin/env bash
# Build the upstream composefs 1.0.8 tools (mkcomposefs, composefs-info,
# mount.composefs) from Debian's source package into a scratch prefix, so
# tests and benchmarks can compare apt-layer with the reference.
#
# Usage: tools/build-upstream-composefs.sh PREFIX
# Prints PREFIX/bin on success. Never required at run time: apt-layer has its
# own implementation; this only provides the oracle.
set -euo pipefail
prefix=${1:?usage: build-upstream-composefs.sh PREFIX}
prefix=$(realpath -m "$prefix")
if [[ -x $prefix/bin/mkcomposefs && -x $prefix/bin/composefs-info ]]; then
  echo "$prefix/bin"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DEBIAN_FRONTEND=noninteractive
deps=(meson ninja-build pkg-config libssl-dev dpkg-dev gcc)
apt-get install -y -qq "${deps[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${deps[@]}" >/dev/null; }
# A private apt configuration that knows only sid's sources (from the archive
# the host's apt uses), so the host's package lists are left alone.
archive=$("$(dirname "$0")/archive-uri.sh")
mkdir -p "$work/apt/lists/partial"
echo "deb-src $archive sid main" > "$work/apt/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=-"
         -o "Dir::State::Lists=$work/apt/lists" -o "APT::Sandbox::User=root")
apt-get "${aptopts[@]}" update -qq >/dev/null
(cd "$work" && apt-get "${aptopts[@]}" source -qq composefs >/dev/null 2>&1)
src=$(find "$work" -maxdepth 1 -type d -name 'composefs-*' | head -n1)
[[ -n $src ]] || { echo "composefs source package not found" >&2; exit 1; }
cd "$src"
meson setup build --prefix="$prefix" -Dfuse=disabled -Dman=disabled \
  -Dc_link_args="-Wl,-rpath,$prefix/lib/$(gcc -print-multiarch):$prefix/lib" >/dev/null
ninja -C build install >/dev/null
echo "$prefix/bin"
