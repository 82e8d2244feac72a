#!/usr/bin/env bash
# Print the URI of the Debian archive this host's apt uses (the first `deb`
# source that is not a security or updates suite), read from
# /etc/apt/sources.list.d/*.sources (deb822) and /etc/apt/sources.list.
# The project names no mirror host: scripts that need the archive ask here.
set -euo pipefail
etc=${APT_ETC:-/etc/apt}
uri=$(
  {
    for f in "$etc"/sources.list.d/*.sources; do
      [[ -f $f ]] || continue
      # One stanza per paragraph: print "URI SUITES" for enabled deb stanzas.
      awk 'BEGIN { RS = ""; FS = "\n" }
           { types = ""; uris = ""; suites = ""; enabled = "yes"
             for (i = 1; i <= NF; i++) {
               if ($i ~ /^Types:/) types = $i
               else if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
               else if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
               else if ($i ~ /^Enabled:[ \t]*no/) enabled = "no"
             }
             if (enabled == "yes" && types ~ /[ \t]deb([ \t]|$)/) {
               split(uris, u, /[ \t]+/); print u[1], suites
             } }' "$f"
    done
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
      [[ -f $f ]] || continue
      sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+([^[:space:]]+).*/\2 \3/p' "$f"
    done
  } | awk '$2 !~ /-(security|updates|backports)$/ && $2 !~ /\// { print $1; exit }'
)
[[ -n $uri ]] || { echo "archive-uri: no Debian archive found in $etc's sources" >&2; exit 1; }
echo "${uri%/}"
