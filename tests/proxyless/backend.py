"""A gRPC backend without generated code: /polaris.test.Echo/Who answers with this server's port."""
import sys
from concurrent import futures

import grpc


def main():
    port = int(sys.argv[1])

    def who(request, context):
        return str(port).encode()

    handler = grpc.method_handlers_generic_handler(
        "polaris.test.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who, request_deserializer=None, response_serializer=None)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
