#!/bin/sh
# What `make test` and `make demo` need from the machine before they install anything: one line
# naming everything missing (and exit 1), or nothing at all. POSIX sh, so that it runs where the
# Python it checks for does not.
#
#   local/prereqs.sh test|demo        (PYTHON and CHROMIUM as the Makefile has them)
#
# test also drives the operating system's Chromium (the console's browser tests): without
# $CHROMIUM it needs apt-get and root or password-free sudo to install it.
goal=${1:-test}
python=${PYTHON:-python3}
chromium=${CHROMIUM:-/usr/bin/chromium}
cd "$(dirname "$0")/.." || exit 1
# The three virtualenvs take 2.3 GiB (.venv 1.7, .venv-sam 0.34, .venv-checkov 0.29) and pip's
# downloads about as much again while it installs; Chromium about 0.3.
need_gib=5
missing=""
add() { missing="${missing:+$missing; }$1"; }

[ "$(uname -s)" = Linux ] || add "Linux (this is $(uname -s))"

if [ ! -e .venv/.installed ]; then
  if ! command -v "$python" >/dev/null 2>&1; then
    add "Python 3.11 or later ($python not found; PYTHON=... names another)"
  elif ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    add "Python 3.11 or later ($python is $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown); PYTHON=... names another)"
  elif ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    add "Python's venv module with ensurepip (Debian/Ubuntu: apt-get install python3-venv)"
  fi
  free_kib=$(df -Pk . 2>/dev/null | awk 'NR == 2 {print $4}')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
    add "${need_gib} GiB of free disk for the virtualenvs ($((free_kib / 1024 / 1024)) GiB free here)"
  fi
fi

if [ "$goal" = test ] && [ ! -x "$chromium" ]; then
  command -v apt-get >/dev/null 2>&1 || add "apt-get, to install Chromium for the browser tests (or $chromium already there)"
  if [ "$(id -u)" != 0 ] && ! sudo -n true >/dev/null 2>&1; then
    add "root or password-free sudo, to install Chromium for the browser tests with apt-get (or $chromium already there)"
  fi
fi

if [ -n "$missing" ]; then
  echo "make $goal needs: $missing" >&2
  exit 1
fi
