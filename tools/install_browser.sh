#!/usr/bin/env bash
# Debian's chromium and chromedriver for the playground's browser test (tests/test_serve.py),
# installed with apt when either is missing (as root, or with sudo); a no-op when both exist.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
echo "installing Debian's chromium and chromium-driver (the playground's browser test)"
sudo_=""
if [ "$(id -u)" != 0 ]; then sudo_="sudo"; fi
$sudo_ apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver >/dev/null
