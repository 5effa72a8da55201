"""[activations]: hook points, context packing, batch sizes and the activation cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saecli.config.base import bad, opt


@dataclass
class ActivationsConfig:
    hook_points: list[str] = opt(
        help="hook points, e.g. ['blocks.6.hook_resid_post'] (see `saecli hooks`)", stream=True
    )
    context_size: int = opt(256, help="tokens per packed context window", stream=True)
    model_batch_size: int = opt(8, help="contexts per model forward", stream=True)
    batch_size: int = opt(4096, help="tokens per training batch", stream=True)
    total_tokens: int = opt(1_000_000, help="tokens to generate into a cache (generate)", stream=True)
    cache_dir: str | None = opt(
        None, help="activation cache folder: written by `generate`, read by train/eval", stream=True
    )
    source: Literal["auto", "cache", "live"] = opt(
        "auto",
        help="where train/eval read activations: 'auto' = the cache when cache_dir exists, else live",
        stream=True,
    )
    chunk_tokens: int = opt(65536, help="tokens per cache chunk file", stream=True)
    override_dtype: Literal["float32", "float16", "bfloat16"] | None = opt(
        None, help="store/stream activations in this dtype", stream=True
    )
    n_shards: int = opt(1, help="split the text into this many shards (one per generating process)", stream=True)
    start_shard: int = opt(0, help="first shard this process writes", stream=True)
    ignore_token_ids: list[int] | None = opt(
        None, help="token ids whose positions are dropped (default: the tokenizer's special tokens)", stream=True
    )
    max_norm_ratio: float = opt(
        10.0,
        help="train/eval drop tokens whose ‖x‖ exceeds this × the batch's median (massive activations, "
        "e.g. attention sinks); 0 = keep every token",
        stream=True,
    )
    shuffle: bool = opt(True, help="shuffle tokens through a bounded buffer", stream=True)
    shuffle_buffer_tokens: int = opt(262144, help="tokens held in the shuffle buffer (memory ∝ this)", stream=True)
    seed: int = opt(42, help="seed of the stream's shuffling", stream=True)
    verify_chunks: Literal["fail", "skip", "off"] = opt(
        "fail",
        help="check each cache chunk's sha256 against the manifest as it is first read (in the background): "
        "'fail' stops naming the chunk, 'skip' trains on without it (with a warning), 'off' trusts the files",
    )

    def validate(self) -> None:
        if not self.hook_points:
            raise bad("hook_points", "must list at least one hook point")
        for name in ("context_size", "model_batch_size", "batch_size", "total_tokens", "chunk_tokens", "n_shards"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be > 0, found {getattr(self, name)}")
        if not 0 <= self.start_shard < self.n_shards:
            raise bad("start_shard", f"must be in [0, n_shards={self.n_shards}), found {self.start_shard}")
        if self.source == "cache" and not self.cache_dir:
            raise bad("source", "'cache' needs activations.cache_dir")
        if self.max_norm_ratio != 0 and not self.max_norm_ratio > 1:
            raise bad(
                "max_norm_ratio", f"must be > 1 (a multiple of the median norm) or 0 (off), found {self.max_norm_ratio}"
            )
        if self.shuffle_buffer_tokens < self.batch_size:
            raise bad(
                "shuffle_buffer_tokens",
                f"must be >= batch_size ({self.batch_size}), found {self.shuffle_buffer_tokens}",
            )
