//! etcd's grpc-gateway HTTP/JSON API (what Apache APISIX and other HTTP clients speak), served
//! on the proxy's one port next to gRPC, answering exactly as etcd 3.4's client port does:
//!
//! - the access controller: `/v3beta/` -> `/v3/`, CORS headers on every answer, `OPTIONS`
//!   answered 200 with no body;
//! - Go's `http.ServeMux`: unclean paths and `/v3` redirected (301), `/version`, `/health`,
//!   `/metrics`, unknown paths `404 page not found`;
//! - the gateway mux under `/v3/`: every etcd route (`POST` only: other methods get
//!   `405 Method Not Allowed`, unknown routes `404 Not Found`), request JSON decoded as
//!   `jsonpb` does ([`jsonpb`]), the call made on the same services gRPC clients use (ranges and
//!   watches from the cache, the rest forwarded), the answer or error written as etcd writes it
//!   ([`errors`], [`stream`]).
//!
//! `Authorization` becomes the gRPC `authorization` metadata and `Grpc-Metadata-*` headers
//! become metadata, as in grpc-gateway (so `Grpc-Metadata-Token` wins over `Authorization`). Lock and election routes,
//! `/debug/vars` and `/config/local/log` are relayed to etcd's own HTTP server
//! ([`upstream_http`]); `/metrics` and `/readyz` are the proxy's own.
//!
//! Its parts: [`mux`] (the access controller and Go's `ServeMux`), [`routes`] (the `/v3/`
//! routes table: every route and the call that answers it), [`endpoints`] (`/version`,
//! `/health`, the relays to etcd's HTTP server, and the proxy's own `/readyz`, `/metrics`),
//! [`streaming`] (watch, keepalive and snapshot streams), [`answer`] (Go's framing of answers,
//! etcd's error answers), [`stream`] (response bodies), [`jsonpb`] and [`json`] (etcd's JSON).
//!
//! Compared with etcd 3.4.23 by `tests/gateway_*.rs` (same requests to both, answers diffed:
//! status, headers, exact JSON text). Known differences, all deliberate or harmless:
//! - headers come in another order and chunk sizes are upper-case hex (HTTP says the latter is
//!   case-insensitive); the HTTP/1.x wire itself (keep-alive, pipelining, chunked bodies,
//!   `Expect`, HTTP/1.0, malformed requests) is [`crate::wire::http1`]'s, diffed against etcd by
//!   `tests/gateway_wire.rs`; a chunked body whose framing breaks after a complete JSON value
//!   is refused with the framing error (etcd decodes the value it read before the break);
//! - a stream message is always exactly one chunk: etcd splits a message over 2 KiB into
//!   two chunks (the JSON, then its newline), which old lua-resty-etcd cannot parse;
//! - JSON over h2c is served (etcd sends every HTTP/2 request to gRPC), WebSocket upgrades and
//!   `X-HTTP-Method-Override` are not; JSON nested deeper than 512 levels is refused (Go
//!   allows 10,000), and a body over 32 MiB is refused unread with etcd's oversized-message
//!   error (etcd reads it whole, then refuses it);
//! - `/health` is etcd's answer, but `{"health":"false"}` (503) while the proxy's caches are
//!   loading or stale (see ARCHITECTURE.md, "Health") or etcd cannot be reached; `/version`
//!   is etcd's answer cached for a minute.
mod answer;
mod endpoints;
pub mod errors;
pub mod gobase64;
pub mod json;
pub mod jsonpb;
mod mux;
mod observe;
mod routes;
pub mod stream;
mod streaming;
pub mod upstream_http;

pub use mux::handle;
