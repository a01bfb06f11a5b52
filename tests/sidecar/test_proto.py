"""The atlas.v1 API: versioned, importable, and its generated code reproducible."""

from __future__ import annotations

from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb
from atlas_sidecar.serving.proto import atlas_v1_pb2_grpc as pb_grpc
from atlas_sidecar.serving.proto import generate


def test_checked_in_generated_code_equals_a_fresh_generation():
    assert generate.stale_files() == []


def test_api_lives_in_the_versioned_package_atlas_v1():
    service = pb.DESCRIPTOR.services_by_name["Atlas"]
    assert pb.DESCRIPTOR.package == "atlas.v1"
    assert service.full_name == "atlas.v1.Atlas"
    assert {m.name for m in service.methods} == {
        "Generate", "GenerateStream", "GetStats", "ResetStats", "RolloutWeights",
    }  # fmt: skip
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert hasattr(pb_grpc, "AtlasStub")


def test_the_proto_source_ships_inside_the_package():
    source = generate.PROTO_DIR / "atlas_v1.proto"
    assert "package atlas.v1;" in source.read_text()
