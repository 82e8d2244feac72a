#!/usr/bin/env bash
# The main workflow of apt-layer, end to end, on a scratch store.
#
# Sets the machine up first (tools/setup.sh), then: builds two system
# images from real directory trees into one deduplicated store, deploys one,
# stages the next image and its deployment in a transaction and commits it
# atomically, mounts the deployment with the kernel, rolls back, deletes and
# collects garbage, layers a Debian package onto a bootstrapped base (install,
# status, packages, diff, uninstall back to the base's digest, rollback), then
# audits the journal with SQL and checks everything.
#
# Usage (as root): tools/demo.sh [WORKDIR]    (default: a new temp dir, removed at the end)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/tools/setup.sh"
export PATH="$repo/.venv/bin:$PATH"
export APT_LAYER_COMPOSEFS_BIN="$repo/.upstream/composefs-1.0.8/bin"

work=${1:-$(mktemp -d /var/tmp/apt-layer-demo.XXXXXX)}
keep=${1:+yes}
mnt="$work/mnt"
cleanup() {
  if mountpoint -q "$mnt" 2>/dev/null; then
    apt-layer --root "$work/store" image unmount "$mnt" >/dev/null 2>&1 || true
  fi
  [[ -n $keep ]] || rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work" "$mnt"
export APT_LAYER_ROOT="$work/store"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Two system trees: a copy of this machine's /etc and /usr/share/doc, and an update of it"
mkdir -p "$work/rootfs-1/usr/share"
cp -a /etc "$work/rootfs-1/etc"
cp -a /usr/share/doc "$work/rootfs-1/usr/share/doc" 2>/dev/null || true
cp -a /usr/lib/python3* "$work/rootfs-1/usr/share/" 2>/dev/null || true
cp -a "$work/rootfs-1" "$work/rootfs-2"
echo "apt-layer demo, release 2" > "$work/rootfs-2/etc/issue"
head -c 200000 /dev/urandom > "$work/rootfs-2/etc/new-in-release-2.bin"
du -sh "$work/rootfs-1" "$work/rootfs-2"

step "Build both images into one store (apt-layer's own builder): identical contents are stored once"
run apt-layer image create --backend python "$work/rootfs-1" release-1
head -c 300000 /dev/urandom > "$work/rootfs-2/etc/draft-only.bin"
run apt-layer image create --backend python "$work/rootfs-2" release-2-draft
rm "$work/rootfs-2/etc/draft-only.bin"
run apt-layer image list

step "Byte for byte what upstream mkcomposefs 1.0.8 writes (when its build is available)"
if [[ -x $APT_LAYER_COMPOSEFS_BIN/mkcomposefs ]]; then
  "$APT_LAYER_COMPOSEFS_BIN/mkcomposefs" --digest-store="$work/upstream-objects" "$work/rootfs-1" "$work/upstream.cfs"
  run cmp "$work/upstream.cfs" "$APT_LAYER_ROOT/images/release-1.composefs"
  echo "identical: $(sha256sum < "$work/upstream.cfs" | cut -c1-16)..."
else
  echo "(upstream tools not built: skipped)"
fi

step "Deploy release-1: it is what the next boot mounts"
run apt-layer deploy release-1

step "A transaction: build release-2 and deploy it, all or nothing"
tx=$(apt-layer tx begin)
run apt-layer image create --backend python --tx "$tx" "$work/rootfs-2" release-2
run apt-layer deploy --tx "$tx" release-2
run apt-layer tx show "$tx"
run apt-layer tx commit "$tx"
run apt-layer status

step "Mount the current deployment with the kernel (erofs + overlayfs)"
if run apt-layer image mount release-2 "$mnt"; then
  run cat "$mnt/etc/issue"
  run ls "$mnt/etc" | head -n 5
  run apt-layer image unmount "$mnt"
else
  echo "(mounting needs root and a kernel with erofs and overlayfs: skipped)"
fi

step "Roll back to release-1, like rpm-ostree rollback"
run apt-layer rollback
run apt-layer status

step "Delete the draft and collect the objects nothing needs any more"
run apt-layer image delete release-2-draft
run apt-layer gc --dry-run
run apt-layer gc

step "Package layering: a Debian base bootstrapped from the archive this host's apt uses"
if run apt-layer base bootstrap bookworm bookworm-base; then
  run apt-layer deploy bookworm-base
  step "apt-layer install hello: base + request -> a new image and the next deployment, atomically"
  run apt-layer install hello
  run apt-layer status
  layered=$(apt-layer status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["deployments"]["current"]["image"])')
  run apt-layer packages "$layered" | grep -E '^MARK|layered'
  run apt-layer diff bookworm-base "$layered" --files
  if apt-layer image mount "$layered" "$mnt" >/dev/null; then
    run chroot "$mnt" /usr/bin/hello
    run apt-layer image unmount "$mnt"
  fi
  step "Uninstall: back to the base itself, the same digest"
  run apt-layer uninstall hello
  apt-layer image info bookworm-base --json | python3 -c 'import json,sys; print("base digest:   ", json.load(sys.stdin)["digest"])'
  apt-layer status --json | python3 -c 'import json,sys; print("current digest:", json.load(sys.stdin)["deployments"]["current"]["digest"])'
  step "Roll back to the layered image"
  run apt-layer rollback
  run apt-layer status
else
  echo "(the Debian archive cannot be reached, or mmdebstrap is missing: skipped)"
fi

step "The journal: every operation is an event; audit it with SQL"
run apt-layer log -n 8
run apt-layer audit "SELECT kind, count(*) AS events FROM events GROUP BY kind ORDER BY events DESC"
run apt-layer audit "SELECT seq, kind, subject, json_extract(actor, '$.user') AS user FROM events WHERE kind LIKE 'image.%'"

step "Checks: hash chain, object digests, recovery has nothing to do"
run apt-layer journal verify
run apt-layer fsck
run apt-layer recover
echo
echo "demo complete: store at $APT_LAYER_ROOT${keep:+ (kept)}"
