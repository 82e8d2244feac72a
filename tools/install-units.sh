#!/bin/sh
# Install apt-layer's systemd units from a source checkout.
#
# The units in aptlayer/data/ run /usr/bin/apt-layer, where the Debian
# package puts it. A checkout's command is .venv/bin/apt-layer (made by
# tools/setup.sh), so this writes the units into /etc/systemd/system/ (or
# $1) with ExecStart pointing there, and reloads systemd. Enable them after:
#   systemctl enable apt-layer-recover
#   systemctl enable --now apt-layer-watch
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
command="$here/.venv/bin/apt-layer"
dest=${1:-/etc/systemd/system}
if [ ! -x "$command" ]; then
    echo "install-units: $command is missing; run tools/setup.sh first" >&2
    exit 1
fi
for unit in "$here"/aptlayer/data/*.service; do
    sed "s|^ExecStart=/usr/bin/apt-layer |ExecStart=$command |" "$unit" > "$dest/$(basename "$unit")"
    echo "installed $dest/$(basename "$unit") (ExecStart=$command)"
done
if [ -z "${1:-}" ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
fi
