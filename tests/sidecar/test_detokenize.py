"""Incremental detokenization equals a full decode, token by token, on the real tokenizer.

Token sequences mix multi-byte text (CJK, emoji, accents: characters split over several
byte-level tokens), random vocabulary ids (byte fragments that never complete) and
special tokens; stop strings are cut from the decoded text across token boundaries.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from atlas_sidecar import models
from atlas_sidecar.engine.core import StopChecker
from atlas_sidecar.engine.detokenize import IncrementalDetokenizer
from atlas_sidecar.engine.sampling import SamplingParams

TEXTS = [
    "日本語のテキストと中文字符，混在 mixed",
    "emoji 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 done",
    "Ünïcödé ñ ç ß ø — “quotes” … €100",
    "def f(x):\n    return x ** 2  # 平方\n\n",
    "한국어 텍스트 그리고 العربية والعبرية עברית",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(models.pull(models.TEST_MODEL))


def full(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


@st.composite
def token_runs(draw: st.DrawFn, tokenizer) -> list[int]:
    """Pieces of real multi-byte text, random ids and special tokens, in any order."""
    pieces: list[list[int]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "random", "special"]))
        if kind == "text":
            text = draw(st.one_of(st.sampled_from(TEXTS), st.text(min_size=1, max_size=20)))
            ids = tokenizer.encode(text, add_special_tokens=False)
            start = draw(st.integers(0, max(0, len(ids) - 1)))  # may start mid-character
            pieces.append(ids[start:])
        elif kind == "random":
            ids = st.integers(0, len(tokenizer) - 1)
            pieces.append(draw(st.lists(ids, min_size=1, max_size=8)))
        else:
            pieces.append([draw(st.sampled_from(tokenizer.all_special_ids))])
    return [t for piece in pieces for t in piece]


@pytest.mark.parametrize("chunked", [False, True], ids=["token by token", "in chunks"])
def test_incremental_text_equals_the_full_decode_after_every_token(tokenizer, chunked):
    @settings(max_examples=150, derandomize=True, deadline=None, database=None)
    @given(tokens=token_runs(tokenizer), chunks=st.lists(st.integers(1, 5), max_size=200))
    def check(tokens, chunks):
        detok = IncrementalDetokenizer(tokenizer)
        sizes = iter(chunks if chunked else [])
        i = 0
        while i < len(tokens):
            n = next(sizes, 1)
            i = min(len(tokens), i + n)
            assert detok.extend(tokens[len(detok.tokens) : i]) == full(tokenizer, tokens[:i])

    check()


def test_each_token_decodes_a_short_tail_not_the_whole_output(tokenizer):
    decoded_lengths: list[int] = []

    class Counting:
        clean_up_tokenization_spaces = False

        def decode(self, tokens, **kw):
            decoded_lengths.append(len(tokens))
            return tokenizer.decode(tokens, **kw)

    tokens = tokenizer.encode("".join(TEXTS) * 4, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting())
    for i in range(len(tokens)):
        detok.extend([tokens[i]])
    assert detok.text == full(tokenizer, tokens)
    assert len(tokens) > 300
    # An emoji can take 4+ byte tokens to complete: the window spans about that much.
    assert max(decoded_lengths) <= 12


def test_a_rolled_back_token_list_is_decoded_afresh(tokenizer):
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    detok.sync(ids)
    assert detok.sync(ids[:5]) == full(tokenizer, ids[:5])
    changed = ids[:5] + [ids[7]]
    detok.sync(ids[:6])
    assert detok.sync(changed) == full(tokenizer, changed)


def reference_stop(tokenizer, tokens: list[int], params: SamplingParams):
    """The old StopChecker: the whole output decoded after every token."""
    text = ""
    for n in range(1, len(tokens) + 1):
        before = len(text)
        text = full(tokenizer, tokens[:n])
        start = max(0, before - max(len(s) for s in params.stop) + 1)
        hits = [i for s in params.stop if (i := text.find(s, start)) >= 0]
        if hits:
            return n, text[: min(hits)]
        if n >= params.max_tokens:
            return n, full(tokenizer, tokens[:n])
    return len(tokens), full(tokenizer, tokens)


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_stop_strings_across_token_boundaries_cut_where_a_full_decode_does(tokenizer, data):
    tokens = data.draw(token_runs(tokenizer))
    text = full(tokenizer, tokens)
    stops = []
    if text:
        # A stretch of the real output: most such stretches straddle token boundaries.
        a = data.draw(st.integers(0, len(text) - 1))
        b = data.draw(st.integers(a + 1, min(len(text), a + 12)))
        stops.append(text[a:b])
    stops += data.draw(
        st.lists(st.text(min_size=1, max_size=4), min_size=1 - len(stops), max_size=2)
    )
    params = SamplingParams(max_tokens=len(tokens), stop=tuple(stops), ignore_eos=True)
    checker = StopChecker(tokenizer, params, frozenset())
    n = 0
    for token in tokens:
        n += 1
        if checker.add(token):
            break
    assert (n, checker.final_text()) == reference_stop(tokenizer, tokens, params)
