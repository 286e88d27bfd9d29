"""Tokenize documents into one packed token stream, cached on disk.

Packing: each document's tokens followed by the tokenizer's EOS, all concatenated; training
blocks are consecutive windows of ``seq_len + 1`` tokens that overlap by one token, so every
token after the first is a prediction target exactly once and nothing is padded.

Cache: ``<processed>/<name>/tokens/<split>-<key>.npy`` where the key hashes the tokenizer's
fingerprint and the documents' content; stored as uint16 when the vocabulary fits (half the
size of int32), read back with ``allow_pickle=False`` and memory-mapped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lora_project.models.tokens import pack_documents, tokenizer_fingerprint
from lora_project.utils.io_utils import atomic_write_bytes


def cached_stream(tokenizer, docs: list[str], cache_dir: Path, split: str,
                  tok_fp: str | None = None) -> np.ndarray:
    """Packed stream of `docs`, from the cache when the tokenizer and content are unchanged."""
    h = hashlib.sha256((tok_fp or tokenizer_fingerprint(tokenizer)).encode())
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    path = Path(cache_dir) / f"{split}-{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # corrupt cache entry: rebuild below
    stream = pack_documents(tokenizer, docs)
    import io

    buf = io.BytesIO()
    np.save(buf, stream, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return stream


def num_blocks(n_tokens: int, seq_len: int) -> int:
    """Full training blocks of seq_len inputs (+1 target) in a stream of n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def block(stream: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Block `index`: tokens [index*seq_len, index*seq_len + seq_len + 1) (a view, no copy)."""
    start = index * seq_len
    return stream[start:start + seq_len + 1]
