#!/usr/bin/env bash
# Installs what the tests need and runs them all: the README's second command, and what CI runs.
#   bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real SMTP clients and servers, HAProxy (it uses our health agent), headless Chromium (the status
# page), clamd and spamd (the content layer's scanner and spam scorer) and sendmail (real backends)
# from Debian (root only; elsewhere the tests that need them skip, except in CI, where a missing one
# fails).
apt_packages=(swaks libnet-ssleay-perl dnsmasq haproxy chromium clamav-daemon spamd sendmail-bin sendmail-cf m4)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    install=(apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}")
    # sendmail's postinst waits on a hostname without a dot (newaliases): give it one for the install,
    # where a UTS namespace can be made.
    if unshare --uts true 2>/dev/null; then
      unshare --uts sh -c 'hostname ci.vipd.test; exec "$@"' sh "${install[@]}" >/dev/null
    else
      "${install[@]}" >/dev/null
    fi
  else
    echo "tests/run.sh: not root: skipping apt-get install of ${missing[*]}" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
exec .venv/bin/python -m pytest "$@"
