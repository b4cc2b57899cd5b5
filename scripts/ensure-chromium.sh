#!/usr/bin/env bash
# The browser tests drive Debian's chromium. Install it when it is missing and this
# machine can (root with apt); otherwise say so: those tests then skip with a reason.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser tests ..." >&2
  apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "could not install chromium: browser tests will be skipped" >&2
else
  echo "chromium is missing and cannot be installed here: browser tests will be skipped" >&2
fi
exit 0
