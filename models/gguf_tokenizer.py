"""The tokenizer and chat template a GGUF file carries, through the ``tokenizers`` library.

llama.cpp stores a vocabulary as lists: ``tokens``, ``token_type`` (1 normal, 3 control, 4
user-defined, 6 byte) and, by kind:

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``): ``tokens`` already spelled in GPT-2's byte
  alphabet (``Ġ`` is a space), ``merges`` (``"Ġ t"``), and ``tokenizer.ggml.pre`` naming how
  text is split into words before the merges apply;
- SentencePiece BPE (``"llama"``), as Gemma's files hold it: ``tokens`` spelled with ``▁`` for a
  space, ``scores``, and no merges. See :func:`sentencepiece_merges` for how they are rebuilt.

Control tokens (``<|im_start|>``, ``<start_of_turn>``) become special tokens, matched whole and
skipped when decoding; user-defined ones are matched whole and kept.

Split rules we do not know, and SentencePiece vocabularies outside the Gemma family (whose prefix
space and normalization differ by model, with nothing in the file to say which) are refused: a
wrong split gives other token ids without any error.
"""

from __future__ import annotations

from typing import Any

from .chat_template import TemplatedTokenizer, default_chat_template

CONTROL, USER_DEFINED = 3, 4
SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SPACE = "\u2581"

# tokenizer.ggml.pre -> the regex words are split with before byte-level BPE (None: GPT-2's own)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
}


def _token(meta: dict[str, Any], key: str, tokens: list[str]) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return None if index is None else tokens[int(index)]


def sentencepiece_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, best first: every way to write a token as
    two vocabulary tokens, tokens in the file's order, a longer left part first.

    A Gemma file lists no merges, and SentencePiece picks at each step the adjacent pair whose
    join is the best-scored token. Gemma's scores fall with the position in the file for normal
    tokens (the score is minus the rank), but the whitespace-run tokens near the start carry the
    -1000 of a user-defined token, which SentencePiece matches whole before any merge; the file's
    order ranks their merges first, which does the same. So the order is the file's (as
    transformers' GGUF loading has it), and a BPE over these merges takes SentencePiece's steps.

    Example::

        sentencepiece_merges(["a", "b", "ab", "abb"])  # [("a", "b"), ("ab", "b")]
    """
    known = set(tokens)
    merges = []
    for token in dict.fromkeys(tokens):
        merges.extend((token[:i], token[i:]) for i in range(len(token) - 1, 0, -1)
                      if token[:i] in known and token[i:] in known)
    return merges


def _sentencepiece(meta: dict[str, Any], tokens: list[str]):
    """A ``tokenizers.Tokenizer`` of a Gemma SentencePiece vocabulary: BPE with byte fallback
    (``<0xF0>`` tokens for bytes no token covers), spaces written as ``▁`` and no prefix space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("the GGUF file sets tokenizer.ggml.add_space_prefix: a SentencePiece vocabulary with a "
                         "prefix space is not supported")
    unknown = _token(meta, "unknown_token_id", tokens)
    if unknown is None:
        raise ValueError("the GGUF file lacks the metadata field 'tokenizer.ggml.unknown_token_id'")
    # Runs of spaces are stored as spaces but looked up after the normalizer, as ▁▁...
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, sentencepiece_merges(tokens), unk_token=unknown, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)     # and no pre-tokenizer: one word, as SentencePiece
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer, tokens


def _byte_level(meta: dict[str, Any], tokens: list[str]):
    """A ``tokenizers.Tokenizer`` of a byte-level BPE vocabulary and its merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("the GGUF file lacks the metadata field 'tokenizer.ggml.merges'")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"the GGUF file's tokenizer.ggml.pre is {pre!r}, a split rule we do not know; "
                         f"known: {', '.join(PRE_TOKENIZER_SPLITS)}")
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    split = PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, tokens


def tokenizer_from_gguf(meta: dict[str, Any]) -> TemplatedTokenizer:
    """Build the tokenizer of a GGUF file from its metadata (:func:`.gguf_loader.metadata`).

    Raises ``ValueError`` naming the field for a missing field, a vocabulary that is neither
    byte-level BPE nor a Gemma SentencePiece one, or a split rule (``tokenizer.ggml.pre``) we do
    not know.
    """
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError("the GGUF file lacks the metadata field 'tokenizer.ggml.model'")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"the GGUF file's tokenizer.ggml.model is {kind!r}; supported: 'gpt2' "
                         f"(byte-level BPE), 'llama' (SentencePiece, in Gemma files)")
    architecture = meta.get("general.architecture")
    if kind == "llama" and architecture not in SENTENCEPIECE_ARCHITECTURES:
        raise ValueError(f"the GGUF file's tokenizer.ggml.model is 'llama' (SentencePiece) in a file of the "
                         f"architecture {architecture!r}; supported: 'gpt2' (byte-level BPE), and 'llama' in "
                         f"the files of {', '.join(SENTENCEPIECE_ARCHITECTURES)}")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file lacks the metadata field 'tokenizer.ggml.tokens'")
    stored = list(meta["tokenizer.ggml.tokens"])
    tokenizer, tokens = (_byte_level if kind == "gpt2" else _sentencepiece)(meta, stored)
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, kind in zip(tokens, types) if kind == CONTROL])
    # a user-defined token respelled for the normalizer (a run of spaces) is reached by the merges
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                          for token, original, kind in zip(tokens, stored, types)
                          if kind == USER_DEFINED and token == original])
    bos = _token(meta, "bos_token_id", stored)
    if meta.get("tokenizer.ggml.add_bos_token", False):
        if bos is None:
            raise ValueError("the GGUF file sets tokenizer.ggml.add_bos_token but lacks "
                             "tokenizer.ggml.bos_token_id")
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return TemplatedTokenizer(tokenizer=tokenizer, bos_token=bos, eos_token=_token(meta, "eos_token_id", stored),
                              chat_template=meta.get("tokenizer.chat_template")
                              or default_chat_template(architecture))
