#!/usr/bin/env bash
# Fuzz the command line's input readers (MNIST IDX, CoNLL-U, replay's .npy) for a bounded time
# each: `scripts/fuzz.sh [SECONDS_PER_TARGET]` (default 60). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Seeds: the real data files when ../shared/data exists,
# plus small files written here. A crash leaves its input in fuzz/artifacts/<target>/ and makes
# this script fail. Not part of CI.
set -euo pipefail
seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
corpus="$root/fuzz/corpus"
mkdir -p "$corpus/idx" "$corpus/conllu" "$corpus/npy"
shared="$root/../shared/data"
if [ -d "$shared/ud" ]; then
  find "$shared/ud" -name '*.conllu' -size -200k -exec cp {} "$corpus/conllu/" \; 2>/dev/null || true
fi
printf '1\tλόγος\tλόγος\tNOUN\t_\t_\t0\troot\t_\t_\n\n' > "$corpus/conllu/one.conllu"
# One image and one label, cut after the two length bytes (the target's input layout).
python3 - "$corpus" <<'PY'
import struct, sys
corpus = sys.argv[1]
images = struct.pack('>IIII', 2051, 1, 28, 28) + bytes(range(256)) * 3 + bytes(16)
labels = struct.pack('>II', 2049, 1) + bytes([7])
open(f"{corpus}/idx/one", "wb").write(struct.pack('<H', len(images)) + images + labels)
def npy(descr, fortran, shape, payload):
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack('<H', len(header)) + header.encode() + payload
open(f"{corpus}/npy/c.npy", "wb").write(npy('<f4', 'False', '(2, 3, 4)', struct.pack('<24f', *range(24))))
open(f"{corpus}/npy/f.npy", "wb").write(npy('<f8', 'True', '(1, 2, 2)', struct.pack('<4d', 1, 2, 3, 4)))
PY
for target in idx conllu npy; do
  echo "== $target: ${seconds}s"
  cargo +nightly fuzz run "$target" "$corpus/$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048
done
