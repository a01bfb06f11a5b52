"""Incremental detokenization: ``decode(tokens)`` kept current by decoding only a tail.

Decoding the whole output after every token costs O(n) per token, O(n^2) per request,
on the engine's worker thread. As vLLM's and TGI's incremental detokenizers do, the
text is kept as a committed part (fixed for good) and a tail re-decoded from a little
before it: ``decode(tokens[prefix:])`` minus ``decode(tokens[prefix:read])``, so that
whatever a decoder does to the first token of a decode (a SentencePiece leading space)
happens in both and cancels. The tail is committed once it is non-empty and does not
end in U+FFFD (an incomplete UTF-8 character whose later bytes may still come); the
window then restarts at the old read offset, so it stays a few tokens long.

The result is exactly the full decode: where a window's text does not extend what was
decoded before it (a decoder that is not local), that step falls back to decoding
everything, and tokenizers that clean up spaces across tokens always do.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Cleaning up spaces (" ." -> ".") rewrites text across token boundaries.
        self.full_only = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""  # always decode(self.tokens)
        self._committed = ""  # decode(tokens[:read]); later tokens cannot change it
        self._prefix = 0
        self._read = 0

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens))

    def extend(self, new_tokens: list[int]) -> str:
        """Append tokens; return the text of all tokens so far."""
        if not new_tokens:
            return self.text
        self.tokens.extend(new_tokens)
        if self.full_only:
            self.text = self._decode(self.tokens)
            return self.text
        before = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        if not window.startswith(before):
            self.text = self._decode(self.tokens)  # not local here: decode it all
            return self.text
        tail = window[len(before) :]
        self.text = self._committed + tail
        if tail and not tail.endswith("\ufffd"):
            self._committed = self.text
            self._prefix, self._read = self._read, len(self.tokens)
        return self.text

    def sync(self, tokens: list[int]) -> str:
        """Catch up with ``tokens``, normally a list this detokenizer has seen a prefix of.

        Should the list have shrunk or its last seen token changed (a step rolled back),
        it starts over from the whole list: exact, at the price of one full decode.
        """
        seen = len(self.tokens)
        if len(tokens) < seen or (seen and tokens[seen - 1] != self.tokens[-1]):
            self._reset()
            seen = 0
        return self.extend(tokens[seen:])
