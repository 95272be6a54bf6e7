#!/usr/bin/env bash
# The AVX-512 + AVX512-BF16 + AVX512-VNNI test suite on an emulated CPU: `make test-avx512-emu`.
#
# Some of our CPUs (AMD Zen 3 VMs) have AVX2 only, and neither qemu-user nor qemu-system
# runs AVX-512. Bochs does: it emulates every instruction in software. Bochs 3.0
# (Debian trixie's source, checked by SHA-256) is built here with AVX-512 (EVEX)
# support, its Skylake-X model patched to Cooper Lake (Skylake-X + AVX512_BF16
# + AVX512_VNNI, tests/emu/bochs-cooperlake.patch: Bochs's Sapphire Rapids model
# has both but hangs Debian's kernel early in boot, as its Tiger Lake does). It
# boots Debian's kernel from a CD image whose initramfs holds the suite, compiled
# statically with -mavx512f -mavx512bf16 -mavx512vnni -mavx512vl (Makefile:
# AVX512_EMU_FLAGS; VNNI's vpdpbusd does the int8 dots of quantized experts),
# and tests/emu/init.c, which runs it and powers off.
#
# Emulation checks correctness only: Bochs is ~100x slower than the host and
# keeps no cache or pipeline timing. The whole suite takes about 10 minutes
# (mostly the train and vit suites; EMU_FILTER=isa about 1.5), plus 3 minutes
# to build Bochs the first time. Everything lands in build/emu.
#
# Prints the suite's output (its last line is "N passed, N failed") and exits
# with the suite's status. EMU_FILTER=a,b,... runs only the tests whose
# "suite.name" contains one of those (as the suite's own argument does). Needs curl, patch, g++,
# cpio, genisoimage, isolinux, syslinux-common, bochsbios and vgabios (Debian
# packages; .ci/run installs them) and apt-get to fetch the kernel package.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
EMU=$ROOT/build/emu
CC=${CC:-cc}
BOCHS_VER=3.0
BOCHS_TAR=bochs_${BOCHS_VER}+dfsg.orig.tar.xz
BOCHS_URL=http://deb.debian.org/debian/pool/main/b/bochs/$BOCHS_TAR
BOCHS_SHA256=78f6c73d4a6472d5130a87ab9dc306d02c7c71ed8e25b3a8ef642e2a7acd282b
BOCHS=$EMU/bochs-$BOCHS_VER/bochs
BIOS=/usr/share/bochs/BIOS-bochs-latest
VGABIOS=/usr/share/vgabios/vgabios.bin
ISOLINUX=/usr/lib/ISOLINUX/isolinux.bin
LDLINUX=/usr/lib/syslinux/modules/bios/ldlinux.c32
TIMEOUT=${EMU_TIMEOUT:-1800}   # seconds of host time for boot + suite

die() { echo "emu: $*" >&2; exit 2; }
missing=()
for t in curl patch g++ cpio genisoimage sha256sum; do command -v $t >/dev/null 2>&1 || missing+=("$t"); done
for f in $BIOS $VGABIOS $ISOLINUX $LDLINUX; do [ -f "$f" ] || missing+=("$f"); done
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: apt-get install curl patch g++ cpio genisoimage isolinux syslinux-common bochsbios vgabios"
mkdir -p "$EMU"

# 1. Bochs with AVX-512, built once.
if [ ! -x "$BOCHS" ]; then
    echo "emu: building Bochs $BOCHS_VER (once, ~3 min)" >&2
    [ -f "$EMU/$BOCHS_TAR" ] || curl -fsSL -o "$EMU/$BOCHS_TAR" "$BOCHS_URL"
    echo "$BOCHS_SHA256  $EMU/$BOCHS_TAR" | sha256sum -c --quiet - || die "$BOCHS_TAR: checksum mismatch"
    rm -rf "$EMU/bochs-$BOCHS_VER"
    tar -C "$EMU" -xf "$EMU/$BOCHS_TAR"
    (cd "$EMU/bochs-$BOCHS_VER" && patch -s -p1 < "$ROOT/tests/emu/bochs-cooperlake.patch" &&
     ./configure --enable-x86-64 --enable-avx --enable-evex --enable-all-optimizations --with-nogui \
                 --enable-pci --enable-cdrom --disable-plugins --disable-sound --disable-usb > ../bochs-configure.log 2>&1 &&
     make -j"$(nproc)" > ../bochs-make.log 2>&1) || die "building Bochs failed: see $EMU/bochs-*.log"
fi

# 2. Debian's kernel (the package linux-image-amd64 points to), fetched once.
if [ ! -f "$EMU/vmlinuz" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || die "apt-cache knows no linux-image-amd64 (run apt-get update)"
    rm -rf "$EMU/kernel" && mkdir -p "$EMU/kernel"
    (cd "$EMU/kernel" && apt-get download "$pkg" > /dev/null 2>&1 && dpkg-deb -x ./*.deb unpacked) || die "could not fetch $pkg"
    cp "$EMU"/kernel/unpacked/boot/vmlinuz-* "$EMU/vmlinuz"
    rm -rf "$EMU/kernel"
fi

# 3. The suite, static, for AVX-512 + AVX512-BF16 + AVX512-VNNI, and its initramfs on a CD image.
make -s -C "$ROOT" build/moe_tests_avx512_static
rm -rf "$EMU/initrd" "$EMU/iso" && mkdir -p "$EMU/initrd/dev" "$EMU/initrd/proc" "$EMU/initrd/tests" \
    "$EMU/initrd/examples" "$EMU/iso/isolinux"
$CC -std=c99 -O2 -Wall -Wextra -Werror -static -o "$EMU/initrd/init" "$ROOT/tests/emu/init.c"
cp "$ROOT/build/moe_tests_avx512_static" "$EMU/initrd/moe_tests"
cp -r "$ROOT/tests/ref" "$ROOT/tests/big" "$EMU/initrd/tests/"
cp -r "$ROOT/examples/data" "$EMU/initrd/examples/"
[ -e "$EMU/initrd/dev/console" ] || mknod -m 600 "$EMU/initrd/dev/console" c 5 1 2>/dev/null || true
(cd "$EMU/initrd" && find . | cpio -o -H newc --quiet | gzip -1 > "$EMU/iso/initrd.gz")
cp "$EMU/vmlinuz" "$EMU/iso/vmlinuz"
cp "$ISOLINUX" "$LDLINUX" "$EMU/iso/isolinux/"
filter=${EMU_FILTER:+ moe_filter=$EMU_FILTER}
cat > "$EMU/iso/isolinux/isolinux.cfg" <<EOF
DEFAULT linux
PROMPT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=ttyS0,115200 quiet loglevel=3 nokaslr mitigations=off lsm=capability idle=halt$filter
EOF
genisoimage -quiet -o "$EMU/boot.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table -J -R "$EMU/iso"

# 4. Boot it. The guest's clock follows its instruction count (sync=none), so
#    a run does the same work whatever the host's load.
cat > "$EMU/bochsrc" <<EOF
megs: 1024
cpu: model=corei7_skylake_x, count=1, ips=400000000
romimage: file=$BIOS
vgaromimage: file=$VGABIOS
ata0-master: type=cdrom, path=$EMU/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$EMU/serial.txt
display_library: nogui
clock: sync=none, time0=local
log: $EMU/bochs.log
panic: action=fatal
error: action=ignore
info: action=ignore
EOF
rm -f "$EMU/serial.txt"
echo "emu: booting the emulated AVX-512 machine (the whole suite: ~10 min)" >&2
timeout "$TIMEOUT" "$BOCHS" -q -f "$EMU/bochsrc" > "$EMU/bochs.out" 2>&1 || true
[ -f "$EMU/serial.txt" ] || die "the guest wrote nothing to its serial port (see $EMU/bochs.out)"
# the guest's console: drop kernel lines ("[  t] ...") and carriage returns
tr -d '\r' < "$EMU/serial.txt" | grep -av '^\[ *[0-9]*\.[0-9]*\]' | grep -v '^EMU-EXIT' || true
rc=$(tr -d '\r' < "$EMU/serial.txt" | sed -n 's/^EMU-EXIT \([0-9]*\)$/\1/p' | tail -n 1)
[ -n "$rc" ] || die "the suite did not finish within ${TIMEOUT} s (serial log: $EMU/serial.txt)"
exit "$rc"
