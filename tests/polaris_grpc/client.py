"""A PolarisMesh gRPC client for the tests, generated at start from proto/polaris/v1 with
grpcio-tools: the wire contract is checked by a client that shares no code with the server.

Usage: client.py ADDR. Reads one JSON command per line on stdin, writes one JSON answer per line:
  {"call": "RegisterInstance" | "DeregisterInstance" | "Heartbeat", "message": {...Instance}, "token": "..."}
  {"call": "ReportClient", "message": {...Client}}
  {"call": "Discover", "requests": [{...DiscoverRequest}, ...]}   (one stream, one answer each)
  {"call": "Raw", "method": "/v1.PolarisGRPC/RegisterInstance", "hex": "..."}  (undecodable bytes)
Messages are protobuf JSON (field names as in the .proto); answers too, with every field.
"""
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc
import importlib.resources

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.join(HERE, "..", "..", "proto", "polaris", "v1")


def generate():
    out = tempfile.mkdtemp(prefix="polaris-grpc-py-")
    wkt = str(importlib.resources.files("grpc_tools") / "_proto")
    files = sorted(f for f in os.listdir(PROTOS) if f.endswith(".proto"))
    rc = protoc.main(
        ["protoc", f"-I{PROTOS}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}"]
        + [os.path.join(PROTOS, f) for f in files]
    )
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)


generate()
import client_pb2  # noqa: E402
import grpcapi_pb2_grpc  # noqa: E402
import request_pb2  # noqa: E402
import response_pb2  # noqa: E402
import service_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402


def to_json(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    stub = grpcapi_pb2_grpc.PolarisGRPCStub(channel)
    for line in sys.stdin:
        cmd = json.loads(line)
        call = cmd["call"]
        metadata = [("x-polaris-token", cmd["token"])] if cmd.get("token") else None
        try:
            if call in ("RegisterInstance", "DeregisterInstance", "Heartbeat"):
                msg = json_format.ParseDict(cmd["message"], service_pb2.Instance())
                answer = to_json(getattr(stub, call)(msg, metadata=metadata, timeout=10))
            elif call == "ReportClient":
                msg = json_format.ParseDict(cmd["message"], client_pb2.Client())
                answer = to_json(stub.ReportClient(msg, metadata=metadata, timeout=10))
            elif call == "Discover":
                reqs = [json_format.ParseDict(r, request_pb2.DiscoverRequest()) for r in cmd["requests"]]
                stream = stub.Discover(iter(reqs), metadata=metadata, timeout=10)
                answer = [to_json(r) for r in stream]
            elif call == "Raw":
                method = channel.unary_unary(cmd["method"], request_serializer=None,
                                             response_deserializer=response_pb2.Response.FromString)
                answer = to_json(method(bytes.fromhex(cmd["hex"]), timeout=10))
            else:
                answer = {"error": f"unknown call {call}"}
        except grpc.RpcError as e:
            answer = {"grpc_status": e.code().name, "details": e.details()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
