"""MLA's decoding state: per token one latent vector plus its decoupled RoPE key, nothing else."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.contiguous import ContiguousCache
from attnkit.ops.decode_block import KVStorage


class LatentCache(ContiguousCache):
    """Latents `(kv_rank,)` and RoPE keys `(rope_heads, rope_dim)` of every token and layer.

    A contiguous cache with one "KV head" whose key is the latent and whose value is the
    flattened RoPE key, so growth, slots, fork, truncate, free and ragged-batch masks are
    `ContiguousCache`'s. `k` holds the latents `(layers, slots, 1, capacity, kv_rank)`, `v`
    the RoPE keys `(layers, slots, 1, capacity, rope_heads * rope_dim)`. Per token and layer
    it stores `kv_rank + rope_heads * rope_dim` values (DeepSeek-V2: 512 + 64).
    """

    undoes_last_step = True  # as `ContiguousCache`: a truncated token is only a length

    def __init__(
        self,
        n_layers: int,
        kv_rank: int,
        rope_dim: int,
        *,
        rope_heads: int = 1,
        max_seqs: int = 1,
        max_len: int | None = None,
        initial_len: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("kv_rank", kv_rank),
            ("rope_dim", rope_dim),
            ("rope_heads", rope_heads),
        ):
            check_positive_int(name, value)
        self.kv_rank, self.rope_dim, self.rope_heads = kv_rank, rope_dim, rope_heads
        super().__init__(
            n_layers,
            1,
            kv_rank,
            v_head_dim=rope_heads * rope_dim,
            max_seqs=max_seqs,
            max_len=max_len,
            initial_len=initial_len,
            dtype=dtype,
            device=device,
        )

    @property
    def values_per_token(self) -> int:
        """Values one layer stores per token: the latent plus every RoPE key head."""
        return self.kv_rank + self.rope_heads * self.rope_dim

    def decode_storage(self) -> KVStorage | None:
        """Latents as K and flattened RoPE keys as V, one block per slot (`ContiguousCache`'s
        layout), for `ops.decode_block.LatentDecodeStack` at a decode step."""
        return self._slot_storage() if type(self) is LatentCache else None

    def update(self, layer: int, latent: Tensor, rope_key: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's latents and (rotated) RoPE keys; return everything cached.

        latent: (batch, n_new, kv_rank); rope_key: (batch, rope_heads, n_new, rope_dim).
        Returns latents (batch, kv_len, kv_rank) and RoPE keys (batch, rope_heads, kv_len,
        rope_dim), views of the buffer when the step's sequences sit in consecutive slots.
        """
        step = self.step
        if step is None:
            raise RuntimeError("update() before prepare(): call cache.prepare(seq_ids, n_new)")
        b, n = step.batch, step.n_new
        for name, t, want in (
            ("latent", latent, (b, n, self.kv_rank)),
            ("rope_key", rope_key, (b, self.rope_heads, n, self.rope_dim)),
        ):
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name} must have shape {want} (batch, n_new from prepare(), this cache's "
                    f"dims), got {tuple(t.shape)}"
                )
        flat_key = rope_key.transpose(1, 2).reshape(b, n, -1)  # (B, n, rope_heads·rope_dim)
        latents, keys = super().update(layer, latent.unsqueeze(1), flat_key.unsqueeze(1))
        kv_len = latents.shape[2]
        keys = keys[:, 0].view(b, kv_len, self.rope_heads, self.rope_dim).transpose(1, 2)
        return latents[:, 0], keys
