#!/usr/bin/env bash
# make test-install: install moe.h into a scratch prefix, build consumer
# projects of tests/consumers/main.c against it (pkg-config, CMake's
# find_package(moe)) and against the source tree (add_subdirectory,
# FetchContent), run them, then a DESTDIR install's file list, and make
# uninstall.
# Needs cmake (>= 3.14) and pkg-config (Debian: apt-get install cmake pkg-config).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/build/consumers
cc=${CC:-cc}
rm -rf "$out" && mkdir -p "$out"
prefix=$out/prefix

make -s -C "$root" install PREFIX="$prefix"

echo "== pkg-config =="
export PKG_CONFIG_PATH=$prefix/share/pkgconfig
version=$(pkg-config --modversion moe)
echo "moe $version"
# shellcheck disable=SC2046   # the flags are meant to split
"$cc" -std=c99 -Wall -Wextra -Werror -pedantic $(pkg-config --cflags moe) \
    -o "$out/pkgconfig" "$root/tests/consumers/main.c" $(pkg-config --libs moe)
"$out/pkgconfig"

# consumer NAME CMAKE-ARGS...: configure, build and run tests/consumers/NAME
consumer() {
    local name=$1
    shift
    echo "== CMake $name =="
    cmake -S "$root/tests/consumers/$name" -B "$out/$name" "$@" > "$out/$name.log"
    cmake --build "$out/$name" >> "$out/$name.log"
    "$out/$name/consumer"
}

consumer find_package -DCMAKE_PREFIX_PATH="$prefix"
# the package really is the installed one; its own version is found exactly and, before
# 1.0, the previous minor version is refused
grep -q "moe_DIR:PATH=$prefix/share/cmake/moe" "$out/find_package/CMakeCache.txt"
mkdir -p "$out/version_check"
minor=$(echo "$version" | cut -d. -f2)
printf '%s\n' 'cmake_minimum_required(VERSION 3.14)' 'project(moe_version_check NONE)' \
    "find_package(moe 0.$(( minor > 0 ? minor - 1 : 99 )) QUIET)" 'if(moe_FOUND)' \
    '  message(FATAL_ERROR "another minor version accepted")' 'endif()' \
    "find_package(moe $version EXACT REQUIRED)" > "$out/version_check/CMakeLists.txt"
cmake -S "$out/version_check" -B "$out/version_check/build" -DCMAKE_PREFIX_PATH="$prefix" \
    > "$out/version_check.log"
echo "find_package(moe $version EXACT) found; another 0.x minor version refused"

consumer add_subdirectory -DMOE_DIR="$root"
consumer fetchcontent -DMOE_DIR="$root"

echo "== DESTDIR and uninstall =="
make -s -C "$root" install PREFIX=/usr/local DESTDIR="$out/stage"
(cd "$out/stage" && find . -type f | sort)
grep -q '^prefix=/usr/local$' "$out/stage/usr/local/share/pkgconfig/moe.pc"
make -s -C "$root" uninstall PREFIX=/usr/local DESTDIR="$out/stage"
left=$(find "$out/stage" -type f | wc -l)
[ "$left" -eq 0 ] || { echo "make uninstall left $left files"; exit 1; }
make -s -C "$root" uninstall PREFIX="$prefix"
[ ! -e "$prefix/include/moe.h" ]
echo "test-install: ok"
