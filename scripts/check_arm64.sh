#!/usr/bin/env bash
# Run the README's two commands (`make install`, `make test`) on 64-bit ARM, emulated: build an
# arm64 Debian root with debootstrap, register qemu-user-static for aarch64 binaries
# (binfmt_misc, "F" flag: the interpreter is opened now, so the root needs no copy of it), export
# the committed tree into the root and run them there; then compare the demo's greedy text with
# this machine's. Not part of CI: about 40 minutes of CPU on a 2-core x86 host. Run as root:
#
#     nice -n 19 scripts/check_arm64.sh 2>&1 | tee arm64.log
#
# ARM64_ROOT (default /var/tmp/rgemma-arm64) is kept between runs: a second run skips debootstrap.
# Result: docs/arm64.md.
set -euo pipefail

ROOT=${ARM64_ROOT:-/var/tmp/rgemma-arm64}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PROMPT="Do you have any pets?"

[ "$(id -u)" = 0 ] || { echo "error: run as root (debootstrap, chroot and binfmt_misc need it)" >&2; exit 1; }

command -v debootstrap >/dev/null && command -v qemu-aarch64-static >/dev/null || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap qemu-user-static >/dev/null
}

# aarch64 ELF executables run through qemu (the pattern Debian's qemu-user-static registers)
BINFMT=/proc/sys/fs/binfmt_misc
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
        > "$BINFMT/register"
fi

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    echo "== debootstrap $SUITE arm64 into $ROOT"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,make,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
fi

mounts=()
cleanup() {
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
for m in proc sys dev; do
    mountpoint -q "$ROOT/$m" || {
        case $m in proc) mount -t proc proc "$ROOT/proc" ;; *) mount --rbind "/$m" "$ROOT/$m" ;; esac
        mounts+=("$ROOT/$m")
    }
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"  # pip needs PyPI
# behind a TLS-intercepting proxy PyPI's certificate is signed by a local CA that only the host's
# bundle has: give the root a copy and point pip and Python's ssl at it
CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA" ] && mkdir -p "$ROOT/etc/ssl/certs" && cp -L "$CA" "$ROOT/etc/ssl/host-ca-bundle.crt"
CAENV="PIP_CERT=/etc/ssl/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt REQUESTS_CA_BUNDLE=/etc/ssl/host-ca-bundle.crt"

echo "== the committed tree ($(git -C "$REPO" rev-parse --short HEAD)) into $ROOT/work/rgemma"
rm -rf "$ROOT/work/rgemma"
mkdir -p "$ROOT/work/rgemma"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT/work/rgemma"

start=$(date +%s)
set +e
# RGEMMA_TEST_TIMEOUT_SCALE: the suite's waits on a child process (the chat on a pty) are
# stretched, since everything runs ~10-30x slower under emulation
chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 $CAENV \
    RGEMMA_TEST_TIMEOUT_SCALE=20 /bin/bash -c 'set -e; cd /work/rgemma; uname -m; python3 --version; make install; make test' \
    | tee "$ROOT/work/rgemma-arm64.log"
status=${PIPESTATUS[0]}
set -e
echo "== make install + make test under emulation: exit $status, $(( $(date +%s) - start )) s"

arm=$(chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    /work/rgemma/.venv/bin/rgemma generate -m demo -t 0 -n 60 -q "$PROMPT")
if [ -x "$REPO/.venv/bin/rgemma" ]; then
    x86=$("$REPO/.venv/bin/rgemma" generate -m demo -t 0 -n 60 -q "$PROMPT")
    if [ "$arm" = "$x86" ]; then same=identical; else same=DIFFERENT; fi
    echo "== demo greedy text, arm64 vs $(uname -m): $same"
    printf 'arm64:  %s\n%s: %s\n' "$arm" "$(uname -m)" "$x86"
fi
exit "$status"
