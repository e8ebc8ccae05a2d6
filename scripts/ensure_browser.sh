#!/usr/bin/env bash
# Headless Chromium + chromedriver from Debian's packages, for the chat page's browser test
# (tests/unit/test_chat_page.py). Installed when missing and apt-get can be used (root, or
# passwordless sudo); otherwise the reason is printed and that test skips with it.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "ensure_browser: no apt-get here; the browser test will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_browser: not root and no passwordless sudo; install chromium and" \
             "chromium-driver to run the browser test" >&2
        exit 0
    fi
fi
echo "ensure_browser: installing chromium and chromium-driver (Debian packages)" >&2
$SUDO apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null \
    || echo "ensure_browser: apt-get install failed; the browser test will skip" >&2
exit 0
