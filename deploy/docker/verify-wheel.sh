#!/bin/sh
# verify-wheel.sh WHEEL DIST VERSION SHA256: refuse a wheel that is not exactly the pinned one.
# verify-wheel.sh --pin-only WHEEL DIST VERSION SHA256: only check that the pin is complete (before a long build).
# Used by Dockerfile.jetson for NVIDIA's onnxruntime-gpu wheel, which no registry this project uses can serve,
# so its pin is a version plus the sha256 that whoever fetched it must give. Checks, in order: the sha256 is given
# and well formed, the file exists, its sha256 matches, and its metadata names DIST at VERSION. Exit 0, 1 or 2.
set -eu
pin_only=0
if [ "${1:-}" = "--pin-only" ]; then pin_only=1; shift; fi
if [ "$#" -ne 4 ]; then
    echo "usage: verify-wheel.sh [--pin-only] WHEEL DIST VERSION SHA256" >&2
    exit 2
fi
wheel=$1 dist=$2 version=$3 want=$4
fail() { echo "verify-wheel: $*" >&2; exit 1; }
[ -n "$version" ] || fail "no version pinned for $dist"
[ -n "$want" ] || fail "no sha256 given for $(basename "$wheel"): pass --build-arg ORT_WHEEL_SHA256=<its sha256> (deploy/docker/README.md says where the wheel and its sha256 come from)"
printf '%s' "$want" | grep -Eq '^[0-9a-f]{64}$' || fail "the sha256 must be 64 lower-case hex digits, got '$want'"
[ "$pin_only" -eq 0 ] || exit 0
[ -f "$wheel" ] || fail "$wheel: no such file (place the wheel in deploy/docker/ before building)"
got=$(sha256sum "$wheel" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "$(basename "$wheel"): sha256 is $got, the pin says $want"
meta=$(python3 -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
    fields = dict(line.split(": ", 1) for line in z.read(name).decode().splitlines() if ": " in line)
print(fields.get("Name", ""), fields.get("Version", ""))
' "$wheel") || fail "$(basename "$wheel"): not a readable wheel"
[ "$meta" = "$dist $version" ] || fail "$(basename "$wheel") is '$meta', the pin says '$dist $version'"
echo "verify-wheel: $(basename "$wheel") is $dist $version, sha256 $got"
