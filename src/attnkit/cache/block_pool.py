"""The block allocator behind the paged cache: free list, reference counts, prefix index.

A block is an integer id; what it stores lives in the cache's pools. A block is in exactly
one of three states:

- referenced: `ref_counts[b] > 0`, in one or more sequences' block tables;
- free: on the free list, holding nothing anyone may look up;
- cached: nobody references it, but it is registered in the prefix index (its K/V for a
  known token prefix are intact), so a later request with that prefix can take it back.
  The allocator hands out free blocks first and then evicts cached ones, least recently
  freed first.

The prefix index maps a chain hash — of the previous block's hash and this block's token
ids — to the block holding those tokens' K/V, as in vLLM's automatic prefix caching.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from attnkit.cache.base import CacheFull


def chain_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """Hash of a full block: its token ids and, through `previous`, every token before it.

    A cryptographic digest, so two different prefixes never share a key in practice (a
    collision would silently hand one request another's K/V). `previous` is b"" for the
    first block.
    """
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """`num_blocks` block ids with reference counts, a free list and a prefix index."""

    def __init__(self, num_blocks: int, *, seed: int | None = None) -> None:
        order = list(range(num_blocks))
        if seed is not None:  # non-monotonic block tables, so tests catch layout assumptions
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(num_blocks, generator=gen).tolist()
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(order)
        self.cached: OrderedDict[int, None] = OrderedDict()  # oldest freed first
        self.index: dict[bytes, int] = {}  # chain hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> chain hash, for indexed blocks
        self.num_used = 0  # blocks with ref_counts > 0

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out now: free ones plus evictable cached ones."""
        return len(self.free) + len(self.cached)

    def allocate(self) -> int:
        """A block for a new writer (ref count 1), evicting a cached block if none is free."""
        if self.free:
            block = self.free.popleft()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            self.unregister(block)
        else:  # callers check capacity first; this guards the pool against a slip
            raise CacheFull("no free block in the pool", needed=1, available=0)
        self.ref_counts[block] = 1
        self.num_used += 1
        return block

    def share(self, block: int) -> None:
        """One more reference to `block` (a fork, or a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self.cached[block]  # a cache hit revives it; a free block is never shared
            self.num_used += 1
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block is cached if indexed, else free."""
        if self.ref_counts[block] < 1:
            raise RuntimeError(f"block {block} released more often than it was referenced")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.num_used -= 1
            if block in self.hash_of:
                self.cached[block] = None
            else:
                self.free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The block holding the tokens hashed to `key`, if it is still cached or in use."""
        return self.index.get(key)

    def register(self, block: int, key: bytes) -> None:
        """Index a full, written block. The first block with given content stays the one
        indexed; a duplicate (the same prompt computed twice) is simply not indexed."""
        if key not in self.index and block not in self.hash_of:
            self.index[key] = block
            self.hash_of[block] = key

    def unregister(self, block: int) -> None:
        """Remove `block` from the index (its contents are about to change)."""
        key = self.hash_of.pop(block, None)
        if key is not None:
            del self.index[key]
