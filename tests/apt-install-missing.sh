#!/usr/bin/env bash
# apt-install-missing.sh PKG... - installs those of the Debian packages PKG... that are not
# installed yet, with apt-get (as root, or through sudo), and says which; does nothing when all
# are there. Used by tests/run.sh (the packages the tests drive) and .ci/run (what only CI needs).
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null; then
  as_root=(sudo)
else
  echo "$0: missing Debian packages ${missing[*]}: run as root, or install sudo" >&2
  exit 1
fi
echo "== apt-get install ${missing[*]}"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
