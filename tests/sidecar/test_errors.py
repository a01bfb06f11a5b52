"""Bad input gets INVALID_ARGUMENT naming the field; the server survives and leaks nothing."""

from __future__ import annotations

import grpc
import pytest

from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.proto import atlas_v1_pb2_grpc as pb_grpc

from .conftest import MAX_TOKENS, PROMPTS, chat, serving

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 128
MAX_MESSAGE_BYTES = 64 << 10


@pytest.fixture(scope="module")
def server(served, reference):
    with serving(
        served.engine,
        max_message_bytes=MAX_MESSAGE_BYTES,
        limits=_limits(),
    ) as s:
        yield s


def _limits():
    from atlas_sidecar.serving.requests import Limits

    # max_tokens may reach past the model's 8192-token context: the engine must refuse.
    return Limits(
        max_prompt_chars=MAX_PROMPT_CHARS, max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens=9000
    )


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.AtlasStub(channel)


def request(prompt: str | None = "Hi", **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if prompt is not None:
        req.prompt = prompt
    return req


def messages(*pairs: tuple[str, str]) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in pairs)
    return req


def token_ids(ids: list[int], **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    req.prompt_token_ids.ids.extend(ids)
    return req


# (case, request, the field the error must name)
BAD_REQUESTS = [
    ("no input", request(None), "input"),
    ("empty prompt", request(""), "prompt"),
    ("blank prompt", request("   \n"), "prompt"),
    ("prompt over the character limit", request("x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
    ("prompt over the token limit", request("hello " * 400), "prompt"),
    ("no messages", messages(), "messages"),
    ("unknown role", messages(("user", "hi"), ("wizard", "hi")), "messages[1].role"),
    ("too many message characters", messages(("user", "y" * (MAX_PROMPT_CHARS + 1))), "messages"),
    ("only empty messages", messages(("user", ""), ("user", "  ")), "messages"),
    ("empty token ids", token_ids([]), "prompt_token_ids"),
    ("negative token id", token_ids([1, -5]), "prompt_token_ids"),
    ("token id past the vocabulary", token_ids([1, 10**9]), "prompt_token_ids"),
    ("too many token ids", token_ids([1] * (MAX_PROMPT_TOKENS + 1)), "prompt_token_ids"),
    ("zero max_tokens", request(max_tokens=0), "sampling.max_tokens"),
    ("negative max_tokens", request(max_tokens=-3), "sampling.max_tokens"),
    ("max_tokens over the server limit", request(max_tokens=10**6), "sampling.max_tokens"),
    ("max_tokens past the context", token_ids([1] * 100, max_tokens=8100), "sampling.max_tokens"),
    ("negative temperature", request(temperature=-0.5), "sampling.temperature"),
    ("huge temperature", request(temperature=1e9), "sampling.temperature"),
    ("NaN temperature", request(temperature=float("nan")), "sampling.temperature"),
    ("temperature that overflows the logits", request(temperature=1e-300), "sampling.temperature"),
    ("temperature below the floor", request(temperature=0.009), "sampling.temperature"),
    ("infinite top_p", request(top_p=float("inf")), "sampling.top_p"),
    ("zero top_p", request(top_p=0.0), "sampling.top_p"),
    ("top_p above one", request(top_p=1.5), "sampling.top_p"),
    ("negative top_k", request(top_k=-1), "sampling.top_k"),
    ("too many stop strings", request(stop=[str(i) for i in range(17)]), "sampling.stop"),
    ("empty stop string", request(stop=[""]), "sampling.stop"),
    ("overlong stop string", request(stop=["s" * 257]), "sampling.stop"),
    ("overlong request id", pb.GenerateRequest(prompt="Hi", request_id="r" * 200), "request_id"),
]


@pytest.mark.parametrize(
    ("bad", "field"), [(r, f) for _, r, f in BAD_REQUESTS], ids=[c for c, _, _ in BAD_REQUESTS]
)
def test_bad_input_is_invalid_argument_naming_the_field(stub, bad, field):
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as raised:
            call(bad, timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(f"{field}: "), raised.value.details()


def test_bytes_that_are_not_a_request_are_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/atlas.v1.Atlas/Generate")
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"\xff\xff\xff\xff garbage", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "atlas.v1.GenerateRequest" in raised.value.details()


def test_oversize_message_is_refused_before_it_reaches_the_service(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(request("z" * (MAX_MESSAGE_BYTES + 1)), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_server_still_serves_and_holds_no_sequence_after_bad_input(stub, served, reference):
    text = PROMPTS[0]
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=MAX_TOKENS))
    req.messages.messages.extend(pb.ChatMessage(**m) for m in chat(text))
    assert list(stub.Generate(req, timeout=120).token_ids) == reference[text].token_ids
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
    assert stats.requests_failed >= len(BAD_REQUESTS)
    assert stats.live_sequences == 0
    assert served.idle()
