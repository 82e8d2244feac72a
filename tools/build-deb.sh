#!/usr/bin/env bash
# Build apt-layer's Debian packages, apt-layer and apt-layer-composefs-tools,
# from this checkout, and check them with lintian.
#
# Usage: tools/build-deb.sh [--no-lintian] [OUTDIR]   (default: a new directory in /tmp)
#
# Copies the checkout (tracked and new files, not ignored ones) to
# OUTDIR/apt-layer-VERSION, fetches the Python dependencies' wheels from PyPI
# into its debian/wheels/ (or copies them from $APT_LAYER_WHEELS, a wheelhouse
# made by `debian/wheels.py fetch`), runs `dpkg-buildpackage -us -uc -b`
# there (the build itself uses no network) and then lintian, which must
# report no error or warning (unless --no-lintian). Prints the paths of the
# .deb files.
# Build dependencies: dpkg-dev, debhelper, python3-pip, lintian
# (installed when missing and run as root).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
lintian=1
if [[ ${1:-} == --no-lintian ]]; then lintian=0; shift; fi
out=$(realpath -m "${1:-$(mktemp -d /tmp/apt-layer-deb.XXXXXX)}")
mkdir -p "$out"

need=()
for pkg in dpkg-dev debhelper python3-pip lintian; do
  dpkg-query -W -f '${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
  if ((EUID != 0)); then
    echo "build-deb: missing build dependencies: ${need[*]} (apt-get install them)" >&2; exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

version=$(dpkg-parsechangelog -l "$repo/debian/changelog" -SVersion)
src=$out/apt-layer-$version
rm -rf "$src" "$out"/apt-layer*_"$version"_*
mkdir -p "$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$src")

if [[ -n ${APT_LAYER_WHEELS:-} ]]; then
  cp -r "$APT_LAYER_WHEELS" "$src/debian/wheels"
else
  python3 "$src/debian/wheels.py" fetch "$src/debian/wheels" 2> >(grep -v '^WARNING: Location' >&2)
fi

if ! (cd "$src" && dpkg-buildpackage -us -uc -b) > "$out/build.log" 2>&1; then
  tail -n 30 "$out/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed; the whole log is $out/build.log" >&2
  exit 1
fi
changes=$out/apt-layer_${version}_$(dpkg --print-architecture).changes
if ((lintian)); then
  lintian --fail-on error,warning --info "$changes" | tee "$out/lintian.log" >&2
fi
ls "$out"/*.deb
