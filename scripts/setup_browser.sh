#!/usr/bin/env bash
# Headless Chromium for tests/test_label_browser.py (the labeling page clicked in a real
# browser): Debian's `chromium` package, installed once with apt-get when we are root and
# it is missing. It never fails the caller: without Chromium the browser test skips and
# says how to get it. HH_JAX_BROWSER=0 skips this script.
set -uo pipefail
[ "${HH_JAX_BROWSER:-1}" = "0" ] && exit 0
for name in chromium chromium-browser chromium-headless-shell google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no Chromium and no root apt-get: the browser test will skip" >&2
  exit 0
fi
echo "installing Debian's chromium for the browser test (once)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! { timeout 180 apt-get update -qq &&
       timeout 420 apt-get install -y -qq --no-install-recommends chromium; } \
    >/tmp/hh_jax_setup_browser.log 2>&1; then
  echo "warning: apt-get install chromium failed (see /tmp/hh_jax_setup_browser.log);" \
       "the browser test will skip" >&2
fi
exit 0
