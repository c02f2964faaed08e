"""Content checksums that skip holes: `sha256-1m`.

The digest of a byte stream is sha256 over the concatenated sha256 digests of its 1 MiB
blocks (the last one may be shorter). An all-zero full block, whether a hole or written
zeros, has a known digest, so sparse files are checksummed in time proportional to their
data, not their size. The definition depends only on the content: a copy, sparse or not,
has the same digest as its source. Reproducible without gfs:

    python3 -c 'import hashlib,sys; f=open(sys.argv[1],"rb"); print(hashlib.sha256(b"".join(
        hashlib.sha256(b).digest() for b in iter(lambda: f.read(1<<20), b""))).hexdigest())' FILE
"""

from __future__ import annotations

import hashlib

ALGORITHM = "sha256-1m"
BLOCK = 1 << 20
ZERO_BLOCK = bytes(BLOCK)
ZERO_BLOCK_DIGEST = hashlib.sha256(ZERO_BLOCK).digest()


class BlockDigest:
    """Incremental `sha256-1m`: feed bytes with `update`, zero runs with `update_zeros`."""

    def __init__(self) -> None:
        self._outer = hashlib.sha256()
        self._partial = hashlib.sha256()
        self._partial_len = 0
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self.size += len(view)
        while view:
            room = BLOCK - self._partial_len
            if self._partial_len == 0 and len(view) >= BLOCK:
                block = view[:BLOCK]
                digest = ZERO_BLOCK_DIGEST if block == ZERO_BLOCK else hashlib.sha256(block).digest()
                self._outer.update(digest)
                view = view[BLOCK:]
                continue
            take = view[:room]
            self._partial.update(take)
            self._partial_len += len(take)
            view = view[len(take):]
            if self._partial_len == BLOCK:
                self._outer.update(self._partial.digest())
                self._partial = hashlib.sha256()
                self._partial_len = 0

    def update_zeros(self, count: int) -> None:
        """Account for `count` zero bytes (a hole) without hashing whole zero blocks."""
        if self._partial_len:
            head = min(count, BLOCK - self._partial_len)
            self.update(ZERO_BLOCK[:head])
            count -= head
        whole, rest = divmod(count, BLOCK)
        for _ in range(whole):
            self._outer.update(ZERO_BLOCK_DIGEST)
        self.size += whole * BLOCK
        if rest:
            self.update(ZERO_BLOCK[:rest])

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._partial_len:
            outer.update(self._partial.digest())
        return outer.hexdigest()
