#!/usr/bin/env bash
# chromium.sh — the headless browser the operator page's browser test drives
# (services/api/tests/browser.rs): Debian's `chromium` package.
#
# Usage: infra/chromium.sh install|path
#   install  installs the package when /usr/bin/chromium is missing (apt-get,
#            through sudo when not root), then prints the binary's path
#   path     prints the path, or fails saying to run `install`
#
# Idempotent: `install` with Chromium present does nothing but print the path.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

usage() {
    echo "usage: $0 install|path" >&2
    exit 2
}

have() {
    [[ -x "$CHROMIUM" ]]
}

install() {
    if have; then
        echo "$CHROMIUM"
        return
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "chromium.sh: not root and no sudo: install Debian's chromium package as root" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "chromium.sh: installing Debian's chromium package (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium >&2
    if ! have; then
        echo "chromium.sh: the chromium package installed no $CHROMIUM" >&2
        exit 1
    fi
    echo "$CHROMIUM"
}

path() {
    if ! have; then
        echo "chromium.sh: $CHROMIUM is missing: run \`infra/chromium.sh install\`" >&2
        exit 1
    fi
    echo "$CHROMIUM"
}

[[ $# -eq 1 ]] || usage
case "$1" in
    install) install ;;
    path) path ;;
    *) usage ;;
esac
