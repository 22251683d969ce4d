//! The wire layer: the listener and everything that reads or writes bytes on a downstream
//! connection: HTTP/2 and HTTP/1.x, gRPC codecs and routes, etcd's HTTP/JSON gateway.

pub mod age;
pub mod body;
pub mod coalesce;
pub mod gate;
pub mod gateway;
pub mod grpc;
pub mod http1;
pub mod lanes;
pub mod server;
pub mod transport;
