"""Tokenizer facts that loading, scoring and data packing all rely on.

Lives in ``models`` (below ``data``) because the scoring core needs the prefix token and the
base loader the tokenizer's fingerprint.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lora_project.errors import UserError

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
