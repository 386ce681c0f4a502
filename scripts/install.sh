#!/usr/bin/env bash
# Installs evomerge with its test extra. torch is installed first, pinned, so that
# the resolver never swaps in a CUDA build (several GB) on a CPU machine.
#
# The PostgreSQL tests (tests/reliability/test_postgres.py) start a real server from Debian's
# `postgresql` package; it is installed here when missing and we are root (apt-get), and skipped
# with a message otherwise (those tests then skip too). Quick when it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

install_postgresql() {
    if compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || command -v pg_ctl >/dev/null; then
        return 0  # already installed
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: PostgreSQL is not installed and this is not root: skipping it" \
             "(the PostgreSQL tests will skip; as root: apt-get install -y postgresql)" >&2
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "install.sh: no apt-get here: install PostgreSQL with this system's package manager" \
             "(the PostgreSQL tests will skip until then)" >&2
        return 0
    fi
    echo "install.sh: installing PostgreSQL (Debian's postgresql package)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

install_postgresql
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
