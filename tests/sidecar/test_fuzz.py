"""Hostile input, generated: any request ends OK or with a client's error, never INTERNAL.

Hypothesis draws every field of a GenerateRequest (in range, at the edges, and past
them: NaN, inf, subnormal temperatures, int32/int64/uint64 extremes, long and odd
unicode strings) and, separately, raw bytes sent as the request message. Through the
real gRPC server on loopback around the small model, the only outcomes allowed are OK,
INVALID_ARGUMENT and RESOURCE_EXHAUSTED; every call has a deadline, so a hang shows as
DEADLINE_EXCEEDED and fails too. Examples are derandomized (the same on every run) and
kept cheap: the server's limits allow at most a few new tokens and short prompts.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_sidecar.errors import RequestError
from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.requests import CHAT_ROLES, Limits, parse_generate_request

from .conftest import serving

ALLOWED = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
LIMITS = Limits(max_prompt_chars=300, max_prompt_tokens=64, max_messages=8, max_tokens=4)
CALL_TIMEOUT_S = 60.0
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
VOCAB = 49152  # SmolLM2's

# Floats at the edges as well as anywhere: hypothesis's floats() rarely lands on 1e-300.
EDGE_FLOATS = st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-300, 1e-9, 0.009, 0.01, 0.5, 1.0, 1.0000001, 100.0, 100.5, 1e308,
     float("inf"), float("-inf"), float("nan"), -1.0]
)  # fmt: skip
FLOATS = st.one_of(EDGE_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.text(max_size=400)  # any code point a proto string can carry (no surrogates)
SHORT_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["Hi", "Name a color.", "\n", "ab"]))


def pick(draw: st.DrawFn, valid: st.SearchStrategy, hostile: st.SearchStrategy):
    """Mostly a valid value, one time in ten anything: so that a good share of requests
    pass every check and reach the engine (sampling, stop strings, streams), where a
    value that slipped through validation would do harm."""
    return draw(hostile if draw(st.integers(0, 9)) == 0 else valid)


NAME = st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=16)
PROMPT = SHORT_TEXT.filter(lambda t: t.strip())


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    params = pb.SamplingParams(
        temperature=pick(draw, st.one_of(st.just(0.0), st.floats(0.01, 2.0)), FLOATS),
        top_k=pick(draw, st.integers(0, 50), INT32),
        stop=pick(
            draw,
            st.lists(st.text(min_size=1, max_size=4), max_size=3),
            st.lists(st.one_of(SHORT_TEXT, st.text(max_size=300)), max_size=18),
        ),
        ignore_eos=draw(st.booleans()),
    )
    max_tokens = pick(draw, st.integers(1, LIMITS.max_tokens), st.one_of(st.none(), INT32))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    top_p = pick(draw, st.one_of(st.none(), st.floats(0.05, 1.0)), FLOATS)
    if top_p is not None:
        params.top_p = top_p
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        params.seed = seed
    return params


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=pick(draw, NAME, st.text(max_size=200)))
    if pick(draw, st.just(True), st.booleans()):
        request.sampling.CopyFrom(draw(sampling()))
    which = pick(
        draw,
        st.sampled_from(["prompt", "messages", "prompt_token_ids"]),
        st.sampled_from(["none", "prompt", "messages", "prompt_token_ids"]),
    )
    if which == "prompt":
        request.prompt = pick(draw, PROMPT, TEXT)
    elif which == "messages":
        roles = st.sampled_from(sorted(CHAT_ROLES))
        valid = st.lists(st.tuples(roles, PROMPT), min_size=1, max_size=3)
        hostile = st.lists(st.tuples(st.one_of(roles, st.text(max_size=10)), TEXT), max_size=10)
        for role, content in pick(draw, valid, hostile):
            request.messages.messages.append(pb.ChatMessage(role=role, content=content))
        if not request.messages.messages:
            request.messages.SetInParent()  # the oneof set, with no message in it
    elif which == "prompt_token_ids":
        valid = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
        hostile = st.lists(st.one_of(st.integers(0, VOCAB - 1), INT64), max_size=80)
        request.prompt_token_ids.ids.extend(pick(draw, valid, hostile))
        if not request.prompt_token_ids.ids:
            request.prompt_token_ids.SetInParent()
    return request


# -- unit level: the parser ---------------------------------------------------------------


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(requests())
def test_parsing_any_request_raises_nothing_but_request_error(request):
    try:
        parsed = parse_generate_request(request, LIMITS)
    except RequestError as exc:
        assert exc.field and str(exc).startswith(f"{exc.field}: ")
        return
    # What passes is what the engine accepts (its own check then adds the context).
    parsed.params.validate(max_new_tokens=LIMITS.max_tokens)


# -- through the server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(served):
    with serving(served.engine, limits=LIMITS, max_message_bytes=64 << 10) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def _outcome(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{exc.code()}: {exc.details()}"
        return exc.code()
    return grpc.StatusCode.OK


_FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(_FUZZ, max_examples=100)
@given(request=requests(), stream=st.booleans())
def test_any_request_ends_ok_or_as_the_clients_error(channel, request, stream):
    data = request.SerializeToString()
    if stream:
        call = channel.unary_stream("/atlas.v1.Atlas/GenerateStream")
        code = _outcome(lambda: list(call(data, timeout=CALL_TIMEOUT_S)))
    else:
        call = channel.unary_unary("/atlas.v1.Atlas/Generate")
        code = _outcome(lambda: call(data, timeout=CALL_TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        # What the server served, its parser accepted: no check is skipped on the wire.
        parse_generate_request(request, LIMITS)


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Valid request bytes cut, spliced with garbage, or with bytes flipped."""
    cut = st.integers(0, len(data)).map(lambda i: data[:i])
    splice = st.tuples(st.integers(0, len(data)), st.binary(max_size=16)).map(
        lambda t: data[: t[0]] + t[1] + data[t[0] :]
    )

    def flip(positions: list[tuple[int, int]]) -> bytes:
        out = bytearray(data)
        for i, b in positions:
            out[i % len(out)] = b
        return bytes(out)

    flips = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                     max_size=4).map(flip)  # fmt: skip
    return st.one_of(cut, splice, flips)


_VALID = pb.GenerateRequest(
    prompt="Hi", request_id="r1",
    sampling=pb.SamplingParams(max_tokens=2, temperature=0.7, top_p=0.9, seed=3, stop=["x"]),
).SerializeToString()  # fmt: skip
RAW = st.one_of(st.binary(max_size=300), _mutations(_VALID))


@_FUZZ
@given(data=RAW, method=st.sampled_from(["Generate", "GenerateStream", "GetStats"]))
def test_any_bytes_as_the_request_end_ok_or_as_the_clients_error(channel, data, method):
    if method == "GenerateStream":
        call = channel.unary_stream(f"/atlas.v1.Atlas/{method}")
        _outcome(lambda: list(call(data, timeout=CALL_TIMEOUT_S)))
    else:
        unary = channel.unary_unary(f"/atlas.v1.Atlas/{method}")
        _outcome(lambda: unary(data, timeout=CALL_TIMEOUT_S))


def test_after_the_fuzz_the_server_serves_and_holds_no_sequence(channel, served):
    stats = pb.GetStatsResponse.FromString(
        channel.unary_unary("/atlas.v1.Atlas/GetStats")(b"", timeout=CALL_TIMEOUT_S)
    )
    assert stats.live_sequences == 0
    assert served.idle()
    ok = channel.unary_unary("/atlas.v1.Atlas/Generate")(_VALID, timeout=CALL_TIMEOUT_S)
    assert len(pb.GenerateResponse.FromString(ok).token_ids) >= 1
