"""Streamed text never shows what the final text will not contain."""

from __future__ import annotations

from atlas_sidecar.serving.scheduler import _stop_prefix_len


def test_a_tail_that_could_grow_into_a_stop_string_is_held_back():
    assert _stop_prefix_len("hello wor", ("world!",)) == 3
    assert _stop_prefix_len("hello\n", ("\n\n",)) == 1
    assert _stop_prefix_len("hello", ("xyz",)) == 0
    assert _stop_prefix_len("abcab", ("abcabd", "b")) == 5
    assert _stop_prefix_len("", ("abc",)) == 0
