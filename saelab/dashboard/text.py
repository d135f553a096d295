"""Token strings that add up to the decoded text, so multi-byte characters are never cut into replacement marks.

A byte-level tokenizer may split one character's UTF-8 bytes over several tokens; decoding token by token then
shows each piece as U+FFFD. Instead we decode the whole sequence once and map token boundaries onto that text:
token k owns the characters of the full decoding that become settled once token k is added, i.e. the ones where
`decode(ids[:k+1])` first agrees with `decode(ids)`. A character split over tokens k and k+1 therefore shows,
whole, on token k+1 (the token that completes it), and token k shows an empty string.

Byte-level BPE tokenizers (GPT-2 style) get their prefix decodings from the tokens' bytes in one pass, checked
against the tokenizer's own decoding of the whole sequence; other tokenizers decode every prefix.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any


def _settled(prefix: str, full: str) -> int:
    """Length of the longest common prefix of `prefix` and `full` (usually all of `prefix`)."""
    if full.startswith(prefix):
        return len(prefix)
    n = min(len(prefix), len(full))
    # The mismatch is almost always a trailing U+FFFD from an incomplete character: search back from the end.
    while n > 0 and not full.startswith(prefix[:n]):
        n -= 1
    return n


def _decode_all(tokenizer: Any, sequences: list[list[int]]) -> list[str]:
    """Decode many sequences at once, in Rust when the tokenizer has a `tokenizers` backend (the Python loop of
    `batch_decode` costs more than the decoding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(sequences, skip_special_tokens=False)
    return tokenizer.batch_decode(sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prefix_decodes(tokenizer: Any, ids: list[int], cuts: range) -> list[str]:
    """`decode(ids[:k])` for each k in cuts, then `decode(ids)`."""
    fast = _byte_level_decodes(tokenizer, ids, cuts)
    return fast if fast is not None else _decode_all(tokenizer, [ids[:k] for k in cuts] + [ids])


def _byte_level_decodes(tokenizer: Any, ids: list[int], cuts: range) -> list[str] | None:
    """`prefix_decodes` for a byte-level BPE (GPT-2 style: each token stands for bytes, and the text is their UTF-8
    decoding, invalid bytes replaced), from the tokens' bytes in one pass instead of one decode per prefix. None for
    other tokenizers, or when the whole sequence does not come out exactly as the tokenizer decodes it."""
    from tokenizers.decoders import ByteLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, ByteLevel):
        return None
    pieces = [_token_bytes(backend.id_to_token(i)) for i in ids]
    data = b"".join(pieces)
    full = data.decode("utf-8", errors="replace")
    if full != backend.decode(ids, skip_special_tokens=False):
        return None
    ends = [0, *itertools.accumulate(map(len, pieces))]  # byte offset after k tokens
    return [data[: ends[k]].decode("utf-8", errors="replace") for k in cuts] + [full]


@functools.lru_cache(maxsize=2**16)
def _token_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for; added tokens (BOS, …) are not byte-encoded: their text as is."""
    decoder = _byte_decoder()
    return bytes(decoder[ch] for ch in token) if all(ch in decoder for ch in token) else token.encode()


def token_strings(tokenizer: Any, ids: list[int], start: int = 0, end: int | None = None) -> list[str]:
    """The text each token of `ids[start:end]` contributes: `"".join(token_strings(tok, ids)) == tok.decode(ids)`
    always holds, and a slice equals the same slice of the whole sequence's strings.

    A slice decodes only the prefixes that end inside it, so the windows of a long sequence cost a few dozen
    decodes rather than one per token. (Settled lengths never shrink as tokens are added; the running maximum only
    guards against odd decoders.)
    """
    end = len(ids) if end is None else min(end, len(ids))
    if start >= end:
        return []
    # bounds[i] = characters settled after the first start + i tokens.
    cuts = range(max(start, 1), min(end, len(ids) - 1) + 1)
    *prefixes, full = prefix_decodes(tokenizer, ids, cuts)
    bounds = [0] if start == 0 else []
    for prefix in prefixes:
        bounds.append(max(bounds[-1] if bounds else 0, _settled(prefix, full)))
    if end == len(ids):
        bounds.append(len(full))
    return [full[bounds[i] : bounds[i + 1]] for i in range(end - start)]


def sequence_strings(tokenizer: Any, tokens: list[list[int]]) -> list[list[str]]:
    """`token_strings` for each sequence of a batch."""
    return [token_strings(tokenizer, ids) for ids in tokens]


def token_label(tokenizer: Any, token_id: int) -> str:
    """One token on its own (for logit tables): its text, or its bytes as `\\xNN` escapes when it is only part of a
    UTF-8 character (a byte-level BPE piece that would otherwise show as U+FFFD)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in decoder for ch in piece):
        return "".join(f"\\x{decoder[ch]:02x}" for ch in piece)
    return text


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}
