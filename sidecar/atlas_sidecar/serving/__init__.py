"""The gRPC sidecar: the atlas.v1 service around one Engine (``atlas serve``)."""
