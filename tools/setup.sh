#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine (as root) for apt-layer development:
# system packages, a virtualenv in .venv with apt-layer and its test extras,
# and the upstream composefs 1.0.8 tools in .upstream/ as the test oracle.
# Idempotent: a second run only checks.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

need=()
command -v fsck.erofs >/dev/null || need+=(erofs-utils)
command -v setfattr >/dev/null || need+=(attr)
command -v losetup >/dev/null || need+=(util-linux)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv python3-pip)
# packages/: bootstrap a base, sandbox maintainer scripts; the tests build a signed repository
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v apt-ftparchive >/dev/null || need+=(apt-utils)
command -v gpg >/dev/null || need+=(gnupg)
command -v dpkg-scanpackages >/dev/null || need+=(dpkg-dev)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v zstd >/dev/null || need+=(zstd)
# The Debian package (tools/build-deb.sh) and its test in Debian 12 and 13 roots.
command -v dpkg-buildpackage >/dev/null || need+=(dpkg-dev)
command -v dh >/dev/null || need+=(debhelper)
command -v lintian >/dev/null || need+=(lintian)
# oci/: registries through skopeo; the tests run Debian's registry and make images with umoci
command -v skopeo >/dev/null || need+=(skopeo)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v umoci >/dev/null || need+=(umoci)
# Static checks (tests/test_static_checks.py): every shell script of the repository.
command -v shellcheck >/dev/null || need+=(shellcheck)
# Booting deployments: the initramfs scripts' check, and the VM tests (pytest -m vm).
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v grub-script-check >/dev/null || need+=(grub-common)
# Real boot loaders in the VM tests (tests/test_vm_loaders.py): UEFI firmware, GRUB's and
# systemd-boot's EFI binaries, and an EFI system partition made without a mount.
[[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ]] || need+=(ovmf)
[[ -d /usr/lib/grub/x86_64-efi ]] || need+=(grub-efi-amd64-bin)
[[ -e /usr/lib/systemd/boot/efi/systemd-bootx64.efi ]] || need+=(systemd-boot-efi)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
if ((${#need[@]})); then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ ! -x $repo/.venv/bin/python ]]; then
  python3 -m venv "$repo/.venv"
fi
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "${repo}[test]" 2> >(grep -v "^WARNING: Location" >&2)

# The oracle: optional. If it cannot be built, tests that compare with it skip.
if ! "$repo/tools/build-upstream-composefs.sh" "$repo/.upstream/composefs-1.0.8" >/dev/null; then
  echo "setup: could not build upstream composefs; comparison tests will skip" >&2
fi
