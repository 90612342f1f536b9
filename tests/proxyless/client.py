"""A proxyless gRPC client: resolves xds:///<target> through the control plane and calls Who in a
loop, printing one line per call: the answering port, or `error <code>`. Stops after DURATION seconds.

Further arguments `key=value` are sent as call metadata; `{n}` in a value becomes the call's
number, so a run can spread calls over many hash keys.

The xDS bootstrap comes from GRPC_XDS_BOOTSTRAP_CONFIG (set by the test)."""
import sys
import time

import grpc


def main():
    target, duration = sys.argv[1], float(sys.argv[2])
    metadata = [tuple(a.split("=", 1)) for a in sys.argv[3:]]
    channel = grpc.insecure_channel(f"xds:///{target}")
    who = channel.unary_unary("/polaris.test.Echo/Who", request_serializer=None, response_deserializer=None)
    end = time.time() + duration
    n = 0
    while time.time() < end:
        md = [(k, v.replace("{n}", str(n))) for k, v in metadata]
        n += 1
        try:
            print(who(b"", timeout=5, metadata=md).decode(), flush=True)
        except grpc.RpcError as e:
            print(f"error {e.code().name} {e.details()}", flush=True)
        time.sleep(0.005)


if __name__ == "__main__":
    main()
