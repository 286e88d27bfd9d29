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

from lora_project.errors import UserError
from lora_project.utils.io_utils import atomic_write_bytes

_BATCH_DOCS = 1000  # documents per tokenizer call (the fast tokenizer parallelises inside a batch)


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable hash of what maps text to ids: the serialised fast tokenizer, else the vocab."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{tok}\n".encode("utf-8"))
    h.update(f"eos={tokenizer.eos_token_id};bos={tokenizer.bos_token_id}".encode())
    return h.hexdigest()


def eos_id(tokenizer) -> int:
    """The end-of-sequence token id that separates packed documents."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate documents")
    return int(tokenizer.eos_token_id)


def prefix_id(tokenizer) -> int:
    """Token prefixed to scored text so the first real token is predicted too: BOS, else EOS."""
    return int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id(tokenizer))


def encode_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, tokenized in batches (no special tokens added)."""
    out: list[list[int]] = []
    for i in range(0, len(docs), _BATCH_DOCS):
        out.extend(tokenizer(docs[i:i + _BATCH_DOCS], add_special_tokens=False)["input_ids"])
    return out


def pack_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """Token stream doc1 EOS doc2 EOS ... as the smallest unsigned dtype that holds the vocab."""
    eos = eos_id(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    encoded = encode_documents(tokenizer, docs)
    total = sum(len(e) + 1 for e in encoded)
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for ids in encoded:
        stream[pos:pos + len(ids)] = ids
        stream[pos + len(ids)] = eos
        pos += len(ids) + 1
    return stream


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
