#!/usr/bin/env bash
# The device check in one command (docs/benchmarks.md): on a bare GPU machine with this checkout and .data/
# (wheels + CIFAR-10 archive, `make device-data`), `bash bench/device_check.sh OUT` installs, tests, benchmarks
# and probes in <= 10 minutes and writes OUT/figures.jsonl. Arguments go to bench/device_check.py (--smoke: CPU).
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/device_check.py "$@"
