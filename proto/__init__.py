"""The wire contract: protobuf definitions and generated gRPC stubs."""
