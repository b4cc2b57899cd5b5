#!/usr/bin/env bash
# The tests use real components from Debian: chromium (browser tests) and redis-server
# (cluster tests). Install what is missing when this machine can (root with apt);
# otherwise say so: those tests then skip with a reason.
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} for the tests ..." >&2
  apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || echo "could not install ${missing[*]}: the tests that need them will be skipped" >&2
  # the package may start a system redis; the tests start their own on free ports
  command -v systemctl >/dev/null 2>&1 && systemctl stop redis-server >/dev/null 2>&1
else
  echo "${missing[*]} missing and cannot be installed here: the tests that need them will be skipped" >&2
fi
exit 0
