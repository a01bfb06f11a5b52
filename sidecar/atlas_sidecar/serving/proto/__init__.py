"""The atlas.v1 gRPC API (and the trainer's atlas.trainer.v1): the .protos and the
Python code generated from them.

Users import the messages and stub from here::

    from atlas_sidecar.serving.proto import atlas_v1_pb2 as pb, atlas_v1_pb2_grpc as pb_grpc

(Not imported eagerly: the generator must run before the generated modules exist.)
"""
