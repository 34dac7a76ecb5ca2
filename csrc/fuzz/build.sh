#!/usr/bin/env bash
# Build the libFuzzer harness of the request decoder with AddressSanitizer
# and UBSan: csrc/fuzz/build.sh OUTPUT.  Used by scripts/fuzz and
# tests/test_fuzz.py.  Needs clang and its compiler-rt (scripts/setup installs
# them).  The core's sources are compiled as in csrc/build_core.py (gnu11),
# the harness as plain C11; all warnings are errors in the harness.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
csrc=$(dirname "$here")
out=${1:?usage: build.sh OUTPUT}
cc=${FUZZ_CC:-clang}
command -v "$cc" >/dev/null || { echo "build.sh: $cc is missing (scripts/setup installs clang)" >&2; exit 1; }

obj=$(mktemp -d "${TMPDIR:-/tmp}/dmoverfs-fuzz-build.XXXXXX")
trap 'rm -rf "$obj"' EXIT

# Coverage guides the fuzzer through the core only: the harness's model
# would add noise, and its byte loops would cost more than the core itself.
san=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1)
inc=(-I "$csrc/core" -I "$csrc/include")
for src in "$csrc"/core/*.c; do
    "$cc" -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fsanitize=fuzzer-no-link "${san[@]}" "${inc[@]}" \
        -c "$src" -o "$obj/$(basename "$src" .c).o" &
done
"$cc" -std=c11 -Wall -Wextra -Werror "${san[@]}" "${inc[@]}" -c "$here/fuzz_decode.c" -o "$obj/fuzz_decode.o" &
wait_all() { local rc=0; for job in $(jobs -p); do wait "$job" || rc=1; done; return $rc; }
wait_all
"$cc" -fsanitize=fuzzer,address,undefined "$obj"/*.o -o "$out.tmp" -lpthread -ldl
mv "$out.tmp" "$out"
