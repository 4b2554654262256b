"""The tokenizer and chat template a GGUF file carries, through the ``tokenizers`` library.

llama.cpp stores a byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) as
three lists: ``tokens`` (already spelled in GPT-2's byte alphabet, so ``Ġ`` is a
space), ``merges`` (``"Ġ t"``) and ``token_type`` (1 normal, 3 control, 4
user-defined). ``tokenizer.ggml.pre`` names how text is split into words before
the merges apply. Control tokens (``<|im_start|>``) become special tokens, matched
whole and skipped when decoding; user-defined ones are matched whole and kept.

Sentencepiece vocabularies (``tokenizer.ggml.model == "llama"``) and split rules
we do not know are refused: a wrong split gives other token ids without any error.
"""

from __future__ import annotations

from typing import Any

from .chat_template import TemplatedTokenizer

CONTROL, USER_DEFINED = 3, 4

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


def tokenizer_from_gguf(meta: dict[str, Any]) -> TemplatedTokenizer:
    """Build the tokenizer of a GGUF file from its metadata (:func:`.gguf_loader.metadata`).

    Raises ``ValueError`` naming the field for a missing field, a vocabulary that is not
    byte-level BPE or a split rule (``tokenizer.ggml.pre``) we do not know.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError("the GGUF file lacks the metadata field 'tokenizer.ggml.model'")
    if kind != "gpt2":
        raise ValueError(f"the GGUF file's tokenizer.ggml.model is {kind!r}; supported: 'gpt2' "
                         f"(byte-level BPE)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"the GGUF file lacks the metadata field {key!r}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"the GGUF file's tokenizer.ggml.pre is {pre!r}, a split rule we do not know; "
                         f"known: {', '.join(PRE_TOKENIZER_SPLITS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
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
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                          for token, kind in zip(tokens, types) if kind == USER_DEFINED])
    bos = _token(meta, "bos_token_id", tokens)
    if meta.get("tokenizer.ggml.add_bos_token", False):
        if bos is None:
            raise ValueError("the GGUF file sets tokenizer.ggml.add_bos_token but lacks "
                             "tokenizer.ggml.bos_token_id")
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return TemplatedTokenizer(tokenizer=tokenizer, bos_token=bos, eos_token=_token(meta, "eos_token_id", tokens),
                         chat_template=meta.get("tokenizer.chat_template"))
