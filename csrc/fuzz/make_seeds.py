"""Write the seed corpus of fuzz_decode (csrc/fuzz/corpus/*.bin).

Each seed is one input in the format fuzz_decode.c describes: an 8-byte
header, 40-byte requests, then the image of the client's arena.  The seeds
cover every function, every validation error and the paths of the three
cores; the fuzzer mutates from there.  Re-run after changing the format:

    python3 csrc/fuzz/make_seeds.py [OUTPUT_DIR]
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

WIN = 0x300000000000  # as in fuzz_decode.c
STUB = WIN
HOLE = WIN + 0x1000
RW = WIN + 0x2000
RO = RW + 0x4000
UNMAPPED = 0x1000
NONCANONICAL = 0xDEAD000000000000

FUNCS = ["zero", "fill8", "copy", *(f"xor{n}" for n in range(2, 17)), "iscsi-crc32c", "fill64", "compare", "copy-crc32c"]
BAD_FUNC, NO_FUNC = len(FUNCS), len(FUNCS) + 1

CORE_INLINE, CORE_CAPPED, CORE_WORKER = 0, 1, 2
DEAD, TWICE, CLOSE_EARLY = 4, 8, 16

OUT = Path(__file__).resolve().parent / "corpus"


class Arena:
    """Bytes of the arena image, allocated from the start; addresses in the client."""

    def __init__(self) -> None:
        self.data = bytearray()

    def put(self, raw: bytes, align: int = 8) -> int:
        while len(self.data) % align:
            self.data.append(0)
        addr = RW + len(self.data)
        self.data += raw
        return addr

    def buf(self, n: int, fill: int = 0x5A) -> int:
        return self.put(bytes((fill + i) & 0xFF for i in range(n)))

    def iovecs(self, segs: list[tuple[int, int]]) -> int:
        return self.put(b"".join(struct.pack("<QQ", a, n) for a, n in segs))

    def dmbufs(self, lists: list[tuple[int, int]]) -> int:
        return self.put(b"".join(struct.pack("<QI4x", a, n) for a, n in lists))

    def inputs(self, seglists: list[list[tuple[int, int]]]) -> int:
        return self.dmbufs([(self.iovecs(s), len(s)) for s in seglists])


def req(out_iov: int = 0, out_cnt: int = 0, imm: bytes = b"", inbuf: int = 0, req_id: int = 0) -> bytes:
    return struct.pack("<QI4x8sQI4x", out_iov, out_cnt, imm.ljust(8, b"\0"), inbuf, req_id)


def seed(func: int, reqs: list[bytes], arena: Arena, flags: int = 0, depth: int = 64, piece: int = 0, take: int = 63) -> bytes:
    header = bytes([func, flags, depth - 1, len(reqs), piece, take, 0, 0])
    return header + b"".join(reqs) + bytes(arena.data)


def cut(addr: int, n: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, n // parts)
    segs, pos = [], 0
    while pos < n:
        k = min(step, n - pos) if len(segs) < parts - 1 else n - pos
        segs.append((addr + pos, k))
        pos += k
    return segs


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    for core, tag in ((CORE_INLINE, ""), (CORE_CAPPED, "-capped"), (CORE_WORKER, "-worker")):
        a = Arena()
        dst = a.buf(96)
        out[f"zero{tag}"] = seed(0, [req(a.iovecs(cut(dst, 96, 3)), 3, req_id=1)], a, core)

        a = Arena()
        dst = a.buf(80)
        out[f"fill8{tag}"] = seed(
            1,
            [req(a.iovecs(cut(dst, 40, 2)), 2, b"\xab", req_id=7), req(a.iovecs([(dst + 40, 40)]), 1, b"\x11", req_id=8)],
            a,
            core,
        )

        a = Arena()
        src, dst = a.buf(100, 1), a.buf(100)
        out[f"copy{tag}"] = seed(2, [req(a.iovecs(cut(dst, 100, 4)), 4, b"imm", a.inputs([cut(src, 100, 3)]), 3)], a, core)

        for n in (2, 3, 16):
            a = Arena()
            srcs = [a.buf(24, 17 * i) for i in range(n)]
            dst = a.buf(24)
            out[f"xor{n}{tag}"] = seed(
                FUNCS.index(f"xor{n}"),
                [
                    req(
                        a.iovecs(cut(dst, 24, 2)),
                        2,
                        inbuf=a.inputs([cut(s, 24, 1 + i % 3) for i, s in enumerate(srcs)]),
                        req_id=n,
                    )
                ],
                a,
                core,
            )

        a = Arena()
        data = a.put(b"123456789")
        first = req(inbuf=a.inputs([cut(data, 9, 2)]), req_id=1)
        out[f"crc{tag}"] = seed(
            18, [first, req(inbuf=a.inputs([[(data, 4)]]), imm=struct.pack("<I", 0xE3069283), req_id=2)], a, core
        )

        a = Arena()
        dst = a.buf(77)
        out[f"fill64{tag}"] = seed(FUNCS.index("fill64"), [req(a.iovecs(cut(dst, 77, 3)), 3, b"ABCDEFGH", req_id=64)], a, core)

        a = Arena()
        x, y = a.buf(50, 9), a.buf(50, 9)
        a.data[y - RW + 37] ^= 0x40  # first difference at 37
        reqs = [
            req(inbuf=a.inputs([cut(x, 50, 2), cut(y, 50, 3)]), req_id=1),
            req(inbuf=a.inputs([cut(x, 30, 1), cut(y, 30, 2)]), req_id=2),  # equal
            req(inbuf=a.inputs([[(x, 0)], [(y, 0)]]), req_id=3),  # empty: equal
        ]
        out[f"compare{tag}"] = seed(FUNCS.index("compare"), reqs, a, core)

        a = Arena()
        src, dst = a.buf(9), a.buf(9)
        a.data[src - RW : src - RW + 9] = b"123456789"
        out[f"copy-crc32c{tag}"] = seed(
            FUNCS.index("copy-crc32c"), [req(a.iovecs(cut(dst, 9, 2)), 2, inbuf=a.inputs([cut(src, 9, 3)]), req_id=5)], a, core
        )

    # Validation errors, each after a good request (a short write), then more.
    a = Arena()
    src, dst = a.buf(32, 3), a.buf(32)
    good = req(a.iovecs([(dst, 32)]), 1, inbuf=a.inputs([[(src, 32)]]), req_id=1)
    bad = {
        "out-count-over-iov-max": req(a.iovecs([(dst, 32)]), 1025, inbuf=a.inputs([[(src, 32)]])),
        "inbuf-in-hole": req(a.iovecs([(dst, 32)]), 1, inbuf=HOLE + 8),
        "inbuf-unmapped": req(a.iovecs([(dst, 32)]), 1, inbuf=UNMAPPED),
        "inbuf-noncanonical": req(a.iovecs([(dst, 32)]), 1, inbuf=NONCANONICAL),
        "in-count-zero": req(a.iovecs([(dst, 32)]), 1, inbuf=a.dmbufs([(a.iovecs([(src, 32)]), 0)])),
        "in-count-over": req(a.iovecs([(dst, 32)]), 1, inbuf=a.dmbufs([(a.iovecs([(src, 32)]), 1025)])),
        "out-array-unmapped": req(UNMAPPED, 1, inbuf=a.inputs([[(src, 32)]])),
        "out-array-past-arena": req(RO + 0x1000 - 8, 1, inbuf=a.inputs([[(src, 32)]])),
        "lengths-mismatch": req(a.iovecs([(dst, 31)]), 1, inbuf=a.inputs([[(src, 32)]])),
        "length-overflow": req(a.iovecs([(dst, 2**63 - 1), (dst, 2)]), 2, inbuf=a.inputs([[(src, 32)]])),
        "overlap": req(a.iovecs([(dst, 32)]), 1, inbuf=a.inputs([[(dst + 16, 16), (src, 16)]])),
        "overlap-top-of-space": req(a.iovecs([(2**64 - 1, 1)]), 1, inbuf=a.inputs([[(2**64 - 1, 1)]])),
        "output-read-only": req(a.iovecs([(RO, 32)]), 1, inbuf=a.inputs([[(src, 32)]])),
        "output-stub": req(a.iovecs([(STUB, 32)]), 1, inbuf=a.inputs([[(STUB + 64, 32)]])),
        "input-unmapped": req(a.iovecs([(dst, 32)]), 1, inbuf=a.inputs([[(src, 16), (UNMAPPED, 16)]])),
        "input-past-arena": req(a.iovecs([(dst, 32)]), 1, inbuf=a.inputs([[(RO + 0x1000 - 16, 32)]])),
        "no-output": req(inbuf=a.inputs([[(src, 32)]])),
    }
    tail = req(a.iovecs([(dst, 16)]), 1, inbuf=a.inputs([[(src + 16, 16)]]), req_id=9)
    for name, r in bad.items():
        out[f"copy-{name}"] = seed(2, [good, r, tail], a)
        out[f"copy-{name}-worker"] = seed(2, [good, r, tail], a, CORE_WORKER)
    out["copy-dead-client"] = seed(2, [good, tail], a, DEAD)
    out["zero-dead-client"] = seed(0, [req(req_id=3), req(a.iovecs([(dst, 8)]), 1)], a, DEAD)
    out["crc-with-output"] = seed(18, [req(a.iovecs([(dst, 32)]), 1, inbuf=a.inputs([[(src, 32)]]))], a)
    out["compare-unequal-lengths"] = seed(FUNCS.index("compare"), [req(inbuf=a.inputs([[(src, 32)], [(dst, 31)]]))], a)
    out["compare-with-output"] = seed(
        FUNCS.index("compare"), [req(a.iovecs([(dst, 16)]), 1, inbuf=a.inputs([[(src, 16)], [(src + 16, 16)]]))], a
    )
    out["zero-empty"] = seed(0, [req(a.iovecs([(UNMAPPED, 0)]), 1, req_id=5), req(req_id=6)], a)

    # Queue depth, pieces, takes, caps, closing with responses pending.
    a = Arena()
    dst = a.buf(64)
    many = [req(a.iovecs([(dst + i, 1)]), 1, bytes([i]), req_id=i) for i in range(20)]
    out["fill8-depth-3"] = seed(1, many, a, depth=3, piece=5, take=2)
    out["fill8-depth-3-worker"] = seed(1, many, a, CORE_WORKER, depth=3, piece=4, take=1)
    out["fill8-request-cap"] = seed(1, many, a, CORE_CAPPED, depth=20, piece=0, take=0)
    out["fill8-close-early"] = seed(1, many, a, CLOSE_EARLY, depth=20, piece=7, take=1)
    out["fill8-close-early-worker"] = seed(1, many, a, CORE_WORKER | CLOSE_EARLY, depth=20, piece=7, take=1)
    a = Arena()
    zeros = a.put(bytes(16 * 8))
    wide = [req(zeros, 1024, inbuf=a.dmbufs([(zeros, 1024)]), req_id=i) for i in range(4)]
    out["copy-metadata-cap"] = seed(2, wide, a, CORE_CAPPED)

    # Setting the function.
    a = Arena()
    dst = a.buf(8)
    r = req(a.iovecs([(dst, 8)]), 1, req_id=1)
    out["no-function"] = seed(NO_FUNC, [r], a)
    out["bad-function"] = seed(BAD_FUNC, [r], a)
    out["bad-function-then-set"] = seed(BAD_FUNC, [r], a, TWICE)
    out["function-twice"] = seed(0, [r], a, TWICE)
    return out


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    for name, data in seeds().items():
        (out / f"{name}.bin").write_bytes(data)
    print(f"{len(list(out.glob('*.bin')))} seeds in {out}")


if __name__ == "__main__":
    main()
