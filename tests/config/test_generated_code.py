"""The committed hstu_pb2.py must be generated from the current hstu.proto (no protoc needed)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, Tuple

import pytest
from google.protobuf import descriptor_pb2

from torchrec_hstu.config import check_generated_code, hstu_pb2
from torchrec_hstu.config.generated import PROTO_PATH, proto_sha256

PB2_PATH = os.path.join(os.path.dirname(PROTO_PATH), "hstu_pb2.py")
TOOLS = os.environ.get("GEN_PROTO_TOOLS", "/tmp/torchrec_hstu_grpcio_tools_1.62.3")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(PROTO_PATH)))


def embedded_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The serialized FileDescriptorProto literally embedded in hstu_pb2.py."""
    with open(PB2_PATH, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    blobs = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
    ]
    assert len(blobs) == 1
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(blobs[0])
    return proto


def parse_proto_text(text: str) -> Tuple[Dict[str, Dict[str, tuple]], Dict[str, Dict[str, int]]]:
    """A small independent reader of our .proto: messages -> {field: (number, label, type, default)}
    and enums -> {name: number}. Handles the subset the schema uses (no nesting, oneofs)."""
    text = re.sub(r"//[^\n]*", "", text)
    messages: Dict[str, Dict[str, tuple]] = {}
    enums: Dict[str, Dict[str, int]] = {}
    for kind, name, body in re.findall(r"\b(message|enum)\s+(\w+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text):
        if kind == "enum":
            enums[name] = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(-?\d+)\s*;", body)}
            continue
        fields = {}
        for label, ftype, fname, number, default in re.findall(
            r"(?:\b(optional|required|repeated)\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*(?:\[\s*default\s*=\s*([^\],]+?)\s*(?:,[^\]]*)?\])?\s*;",
            body,
        ):
            fields[fname] = (int(number), label or "oneof", ftype, default.strip('"') if default else None)
        messages[name] = fields
    return messages, enums


_LABELS = {1: "optional", 2: "required", 3: "repeated"}
_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
}


def test_recorded_digest_matches_proto():
    check_generated_code()
    assert hstu_pb2.PROTO_SHA256 == proto_sha256()


def test_edited_proto_is_detected(tmp_path):
    with open(PROTO_PATH, encoding="utf-8") as handle:
        original = handle.read()
    edited = tmp_path / "hstu.proto"
    edited.write_text(original.replace("[default = 0.3]", "[default = 0.25]"), encoding="utf-8")
    with pytest.raises(RuntimeError, match=r"generated from a different hstu.proto.*gen_proto.sh"):
        check_generated_code(str(edited))
    edited.write_text(original.replace("message STU {", "message STU {\n  optional uint32 extra = 99;"))
    with pytest.raises(RuntimeError, match="gen_proto.sh"):
        check_generated_code(str(edited))


def test_embedded_descriptor_matches_proto_text():
    """Field names, numbers, labels, types and defaults as written in the .proto."""
    with open(PROTO_PATH, encoding="utf-8") as handle:
        messages, enums = parse_proto_text(handle.read())
    embedded = embedded_file_descriptor()
    assert embedded.package == "torchrec_hstu.config"
    assert sorted(messages) == sorted(m.name for m in embedded.message_type)
    for message in embedded.message_type:
        fields = {}
        for f in message.field:
            label = "oneof" if f.HasField("oneof_index") else _LABELS[f.label]
            ftype = _SCALARS.get(f.type, f.type_name.rsplit(".", 1)[-1])
            default = f.default_value if f.HasField("default_value") else None
            fields[f.name] = (f.number, label, ftype, default)
        text_fields = messages[message.name]
        assert sorted(text_fields) == sorted(fields), message.name
        for name, (number, label, ftype, default) in text_fields.items():
            e_number, e_label, e_type, e_default = fields[name]
            assert (number, label, ftype) == (e_number, e_label, e_type), f"{message.name}.{name}"
            if default is not None:
                if ftype in ("float", "double"):
                    assert float(default) == pytest.approx(float(e_default), rel=1e-7)
                else:
                    assert default == e_default, f"{message.name}.{name}"
            else:
                assert e_default is None, f"{message.name}.{name}"
    assert {e.name: {v.name: v.number for v in e.value} for e in embedded.enum_type} == enums


def test_anchor_field_numbers():
    stu = {f.name: f.number for f in hstu_pb2.STU.DESCRIPTOR.fields}
    assert stu["contextual_seq_len"] == 13 and stu["sla_k1"] == 14 and stu["sla_k2"] == 15
    assert stu["scaling_seqlen"] == 16 and stu["fp8_quant_mode"] == 17
    assert sorted(stu.values()) == list(range(1, 19))
    assert stu["uvqk_activation"] == 18  # ours, after TorchEasyRec's 1..17
    hstu = {f.name: f.number for f in hstu_pb2.HSTU.DESCRIPTOR.fields}
    assert hstu == {
        "stu": 1, "input_dropout_ratio": 2, "attn_num_layers": 3, "positional_encoder": 4,
        "input_preprocessor": 5, "output_postprocessor": 6, "attn_truncation_split_layer": 7,
        "attn_truncation_tail_len": 8, "name": 9,
    }
    s = hstu_pb2.STU()
    assert (s.contextual_seq_len, s.scaling_seqlen, s.fp8_quant_mode) == (-1, -1, -1)


def test_generated_code_has_no_runtime_version_check():
    """protobuf >= 5.26 gencode refuses older runtimes; ours must import under protobuf 5, 6, 7."""
    with open(PB2_PATH, encoding="utf-8") as handle:
        source = handle.read()
    assert "runtime_version" not in source, "regenerate with scripts/gen_proto.sh (grpcio-tools 1.62.3)"
    assert "Protobuf Python Version: 4.25" in source


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(TOOLS, "grpc_tools")),
    reason=f"grpcio-tools not in {TOOLS} (scripts/gen_proto.sh installs it there)",
)
def test_embedded_descriptor_equals_protoc_output(tmp_path):
    out = tmp_path / "set.pb"
    env = dict(os.environ, PYTHONPATH=TOOLS)
    subprocess.run(
        [shutil.which("python3") or sys.executable, "-m", "grpc_tools.protoc", "-I", REPO,
         f"--descriptor_set_out={out}", os.path.relpath(PROTO_PATH, REPO)],
        check=True, cwd=REPO, env=env,
    )
    file_set = descriptor_pb2.FileDescriptorSet()
    file_set.ParseFromString(out.read_bytes())
    from_protoc = file_set.file[0]
    for message in from_protoc.message_type:
        for field in message.field:
            field.ClearField("json_name")  # the python generator drops json_name
    assert from_protoc == embedded_file_descriptor()
