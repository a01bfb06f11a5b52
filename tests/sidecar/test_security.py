"""Bearer tokens, admin RPCs, TLS and mutual TLS on loopback, and prompt-free logs."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from atlas_sidecar.serving.app import ServerConfig, TlsConfig, plaintext_token_warning
from atlas_sidecar.serving.auth import bearer_token, tokens_match
from atlas_sidecar.serving.client import NO_RETRY, AtlasError

from .conftest import PROMPTS, _make_leaf, chat, serving

TOKEN = "data-token-123"
ADMIN = "admin-token-456"


def _code(call) -> grpc.StatusCode:
    with pytest.raises(AtlasError) as raised:
        call()
    return raised.value.code


# -- tokens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(served, reference):
    with serving(served.engine, auth_token=TOKEN, admin_token=ADMIN) as s:
        yield s


def test_with_auth_on_every_data_rpc_needs_the_token(auth_server, client_for):
    anonymous = client_for(auth_server, retry=NO_RETRY)
    wrong = client_for(auth_server, retry=NO_RETRY, token="guess")
    right = client_for(auth_server, retry=NO_RETRY, token=TOKEN)
    for client in (anonymous, wrong):
        assert _code(lambda c=client: c.generate("Hi", max_tokens=1)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(lambda c=client: list(c.generate_stream("Hi", max_tokens=1))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(client.stats) == grpc.StatusCode.UNAUTHENTICATED
    assert len(right.generate("Hi", max_tokens=2).token_ids) == 2
    assert right.stats().requests_ok >= 1


def test_with_auth_on_health_stays_open_and_reflection_is_closed(auth_server):
    with grpc.insecure_channel(auth_server.address) as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            next(stub.ServerReflectionInfo(iter([request])))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_rpcs_need_the_admin_token(auth_server, client_for):
    data = client_for(auth_server, retry=NO_RETRY, token=TOKEN)
    admin = client_for(auth_server, retry=NO_RETRY, token=ADMIN)
    anonymous = client_for(auth_server, retry=NO_RETRY)
    assert _code(anonymous.reset_stats) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(data.reset_stats) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: data.rollout_weights("v2")) == grpc.StatusCode.PERMISSION_DENIED
    data.generate("Hi", max_tokens=1)
    assert admin.stats().requests_ok >= 1
    admin.reset_stats()
    assert admin.stats().requests_total == 0


def test_rollout_records_the_requested_version_and_keeps_serving(auth_server, client_for):
    admin = client_for(auth_server, retry=NO_RETRY, token=ADMIN)
    rollout = admin.rollout_weights("drafter-2026.05.01")
    assert rollout.requested_version == "drafter-2026.05.01"
    assert rollout.serving_version == "base"
    assert not rollout.applied
    stats = admin.stats()
    assert stats.requested_weight_version == "drafter-2026.05.01"
    assert stats.weight_version == "base"
    assert _code(lambda: admin.rollout_weights("../../etc/passwd")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_without_auth_data_rpcs_are_open_and_admin_rpcs_are_refused(served, client_for):
    with serving(served.engine) as server:
        client = client_for(server, retry=NO_RETRY, token="anything")
        assert len(client.generate("Hi", max_tokens=1).token_ids) == 1
        assert _code(client.reset_stats) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: client.rollout_weights("v2")) == grpc.StatusCode.PERMISSION_DENIED


def test_without_an_admin_token_the_data_token_never_opens_admin_rpcs(served, client_for):
    with serving(served.engine, auth_token=TOKEN) as server:
        data = client_for(server, retry=NO_RETRY, token=TOKEN)
        assert len(data.generate("Hi", max_tokens=1).token_ids) == 1
        for call in (data.reset_stats, lambda: data.rollout_weights("v2")):
            with pytest.raises(AtlasError) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "no admin token configured" in raised.value.details
        assert data.stats().requested_weight_version == ""


def test_bearer_tokens_parse_and_compare_exactly():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert tokens_match("abc", "abc")
    assert not tokens_match("abc", "abd")
    assert not tokens_match("abc", "abcd")


# -- TLS ------------------------------------------------------------------------------


def test_tls_serves_clients_that_trust_the_ca_only(served, certs, client_for):
    tls = TlsConfig(certs.server_cert, certs.server_key)
    with serving(served.engine, tls=tls) as server:
        trusted = client_for(server, retry=NO_RETRY, ca_cert=certs.ca, timeout=30)
        assert len(trusted.generate("Hi", max_tokens=2).token_ids) == 2
        plaintext = client_for(server, retry=NO_RETRY, timeout=5)
        assert _code(lambda: plaintext.generate("Hi", max_tokens=1)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        untrusting = client_for(server, retry=NO_RETRY, ca_cert=certs.other_ca, timeout=5)
        assert _code(lambda: untrusting.generate("Hi", max_tokens=1)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_needs_a_client_certificate_from_the_ca(served, certs, client_for):
    tls = TlsConfig(certs.server_cert, certs.server_key, client_ca_file=certs.ca)
    with serving(served.engine, tls=tls) as server:
        with_cert = client_for(
            server, retry=NO_RETRY, ca_cert=certs.ca, client_cert=certs.client_cert,
            client_key=certs.client_key, timeout=30,
        )  # fmt: skip
        assert len(with_cert.generate("Hi", max_tokens=2).token_ids) == 2
        without_cert = client_for(server, retry=NO_RETRY, ca_cert=certs.ca, timeout=5)
        assert _code(lambda: without_cert.generate("Hi", max_tokens=1)) == (
            grpc.StatusCode.UNAVAILABLE
        )


# -- logs -----------------------------------------------------------------------------


def test_logs_carry_no_prompt_text_by_default(served, client_for, caplog):
    secret = "my card number is 4111 1111 1111 1111"
    with caplog.at_level(logging.DEBUG, logger="atlas_sidecar"):
        with serving(served.engine) as server:
            client = client_for(server)
            client.generate(messages=chat(secret), max_tokens=2)
            client.generate(secret, max_tokens=2)
            list(client.generate_stream(messages=chat(PROMPTS[0] + secret), max_tokens=2))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "done" in logged  # requests are logged...
    assert "4111" not in logged  # ...without their text


def test_a_certificate_rotated_on_disk_is_served_to_new_connections(
    served, certs, client_for, tmp_path
):
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(certs.server_cert, live / "tls.crt")
    shutil.copy(certs.server_key, live / "tls.key")
    # A second server certificate, from the other CA: which CA a client must trust
    # tells which certificate the server presented.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(certs.other_ca, other / "ca.pem")
    shutil.copy(certs.other_ca.with_suffix(".key"), other / "ca.key")
    extensions = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    _make_leaf("server", "localhost", extensions, other)
    tls = TlsConfig(live / "tls.crt", live / "tls.key")
    with serving(served.engine, tls=tls) as server:
        before = client_for(server, retry=NO_RETRY, ca_cert=certs.ca, timeout=30)
        assert len(before.generate("Hi", max_tokens=1).token_ids) == 1
        # Swapped in whole files, as a kubelet-refreshed Secret mount does.
        for name, source in (("tls.key", "server.key"), ("tls.crt", "server.pem")):
            shutil.copy(other / source, live / f"{name}.new")
            os.replace(live / f"{name}.new", live / name)
        after = client_for(server, retry=NO_RETRY, ca_cert=certs.other_ca, timeout=30)
        assert len(after.generate("Hi", max_tokens=1).token_ids) == 1
        stale = client_for(server, retry=NO_RETRY, ca_cert=certs.ca, timeout=5)
        assert _code(lambda: stale.generate("Hi", max_tokens=1)) == grpc.StatusCode.UNAVAILABLE


# -- exposure ----------------------------------------------------------------------------


def test_metrics_bind_to_loopback_unless_another_host_is_asked_for(served):
    with serving(served.engine, metrics_port=0) as server:
        http = server.server._metrics_http
        assert http.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as page:
            assert b"atlas" in page.read()
    with serving(served.engine, metrics_port=0, metrics_host="0.0.0.0") as server:
        assert server.server._metrics_http.server_address[0] == "0.0.0.0"


def test_a_token_on_a_plaintext_network_port_warns_once_at_start(served, caplog):
    with caplog.at_level(logging.WARNING, logger="atlas_sidecar"):
        with serving(served.engine, host="0.0.0.0", auth_token=TOKEN):
            pass
        with serving(served.engine, auth_token=TOKEN):  # loopback: no warning
            pass
    warnings = [r for r in caplog.records if "plaintext" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "0.0.0.0" in warnings[0].getMessage()


def test_no_plaintext_warning_with_tls_or_without_tokens(certs):
    tls = TlsConfig(certs.server_cert, certs.server_key)
    assert plaintext_token_warning(ServerConfig(host="0.0.0.0", auth_token=TOKEN, tls=tls)) is None
    assert plaintext_token_warning(ServerConfig(host="0.0.0.0")) is None
    assert plaintext_token_warning(ServerConfig(host="10.0.0.5", admin_token=ADMIN)) is not None
    assert plaintext_token_warning(ServerConfig(host="::1", auth_token=TOKEN)) is None
