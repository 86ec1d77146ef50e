"""The committed stubs must match the .proto files: regenerate with `make protos` when this fails."""

import importlib

from google.protobuf import descriptor_pb2

from scripts.gen_protos import generate, proto_files


def _without_json_names(f: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc adds json_name to descriptor sets but not to generated stubs; compare without them."""
    f = descriptor_pb2.FileDescriptorProto.FromString(f.SerializeToString())

    def clear(messages) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            clear(message.nested_type)  # a map field's entry message

    clear(f.message_type)
    return f


def test_stubs_are_not_stale(tmp_path):
    desc = tmp_path / "set.pb"
    generate(out_dir=tmp_path, descriptor_out=desc)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    assert {f.name for f in fresh.file} == {f"protos/imsearch/v1/{p.name}" for p in proto_files()}
    for f in fresh.file:
        module = importlib.import_module(f.name.replace("/", ".").removesuffix(".proto") + "_pb2")
        committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert _without_json_names(committed) == _without_json_names(f), f"{f.name}: stubs are stale; run `make protos`"
        grpc_module = importlib.import_module(module.__name__ + "_grpc")
        for service in f.service:
            stub = getattr(grpc_module, f"{service.name}Stub")
            servicer = getattr(grpc_module, f"{service.name}Servicer")
            for method in service.method:
                assert hasattr(servicer, method.name), f"{service.name}.{method.name} missing: stale grpc stubs"
            assert stub is not None


def test_stubs_import_as_a_package_and_round_trip():
    from protos.imsearch.v1 import imsearch_pb2

    req = imsearch_pb2.SearchRequest(query=imsearch_pb2.Query(vector=imsearch_pb2.Vector(values=[0.5, 1.0])), k=3)
    back = imsearch_pb2.SearchRequest.FromString(req.SerializeToString())
    assert back.query.WhichOneof("query") == "vector" and list(back.query.vector.values) == [0.5, 1.0]
