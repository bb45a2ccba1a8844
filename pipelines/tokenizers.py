"""Offline tokenizers over the miniature vocabulary: no hub, no vocabulary files, no sentencepiece.

CLIP's byte-level BPE gets one merge chain per word (so every caption word is one token) plus the
single characters, so any text still tokenizes; T5's unigram model gets one piece per word plus
characters. Both round-trip through save_pretrained/from_pretrained.
"""
from __future__ import annotations

import string

from .data import vocabulary

MAX_LENGTH = 16


def clip_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH):
    from transformers import CLIPTokenizer

    words = words or vocabulary()
    symbols: list[str] = ["<|startoftext|>", "<|endoftext|>"]
    symbols += [c for c in string.ascii_lowercase] + [c + "</w>" for c in string.ascii_lowercase]
    merges: list[tuple[str, str]] = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            symbols.append(parts[0])
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        unk_token="<|endoftext|>")
    return tok


def t5_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH):
    from transformers import T5Tokenizer

    words = words or vocabulary()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase] + [("\u2581" + c, -4.0) for c in string.ascii_lowercase
                                                             if c not in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
