"""Bearer-token checks for every RPC, and the admin token for admin RPCs.

The health service stays open: kubelet's gRPC probes cannot send metadata. Tokens are
compared in constant time so response timing does not leak how much of a guess matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def bearer_token(metadata: Any) -> str | None:
    """The token from an ``authorization: Bearer <token>`` header, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def tokens_match(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuse RPCs without the right token, before the request is even deserialized."""

    def __init__(
        self, token: str | None, admin_token: str | None, admin_methods: frozenset[str]
    ) -> None:
        self.token = token or None
        self.admin_token = admin_token or None
        self.admin_methods = admin_methods

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None if allowed, else the status code and message to refuse with."""
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return None
        presented = bearer_token(metadata)
        if method in self.admin_methods:
            if self.admin_token is None:
                return grpc.StatusCode.PERMISSION_DENIED, (
                    "admin RPCs are disabled: the server has no admin token configured"
                )
            if presented is None:
                return grpc.StatusCode.UNAUTHENTICATED, "admin RPCs need the admin bearer token"
            if not tokens_match(presented, self.admin_token):
                return grpc.StatusCode.PERMISSION_DENIED, "not the admin token"
            return None
        if self.token is None:
            return None
        if presented is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (authorization)"
        if not tokens_match(presented, self.token) and not (
            self.admin_token and tokens_match(presented, self.admin_token)
        ):
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as ``handler`` that only aborts."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    # No deserializer: a refused request's bytes are never parsed.
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)
