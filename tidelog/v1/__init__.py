"""Generated protobuf and gRPC code for the tidelog.v1 API (see proto/); do not edit by hand."""
