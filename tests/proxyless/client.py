"""A proxyless gRPC client: resolves xds:///<target> through the control plane and calls Who in a
loop, printing one line per call: the answering port, or `error <code>`. Stops after DURATION seconds.

The xDS bootstrap comes from GRPC_XDS_BOOTSTRAP_CONFIG (set by the test)."""
import sys
import time

import grpc


def main():
    target, duration = sys.argv[1], float(sys.argv[2])
    channel = grpc.insecure_channel(f"xds:///{target}")
    who = channel.unary_unary("/polaris.test.Echo/Who", request_serializer=None, response_deserializer=None)
    end = time.time() + duration
    while time.time() < end:
        try:
            print(who(b"", timeout=5).decode(), flush=True)
        except grpc.RpcError as e:
            print(f"error {e.code().name} {e.details()}", flush=True)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
