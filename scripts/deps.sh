#!/bin/sh
# scripts/deps.sh - make sure the Debian packages samepage needs are here.
# As root, installs what is missing with apt-get; otherwise prints the one
# line to run.  The README says why each package is needed.
#   scripts/deps.sh          what building and the demo need
#   scripts/deps.sh --test   and what the test suite needs too (QEMU)
set -eu

PKGS="build-essential libxxhash-dev liburing-dev libcmocka-dev python3 mandoc gnuplot-nox"
case "${1:-}" in
--test) PKGS="$PKGS qemu-system-x86" ;;
"") ;;
*) echo "usage: scripts/deps.sh [--test]" >&2; exit 2 ;;
esac

missing=""
for p in $PKGS; do
	if ! dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
		missing="$missing $p"
	fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
	echo "deps: installing$missing" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $missing >&2
	exit 0
fi
echo "samepage needs:$missing.  Run:" >&2
echo "  sudo apt-get install -y$missing" >&2
exit 1
