//! End-to-end tests: a real gateway on 127.0.0.1:0, real WebSocket clients, real gRPC clients.
//! One test crate with a module per capability (`cargo test --test integration fanout`).

#![allow(unreachable_pub)] // test modules share helpers with `pub`

mod browser;
mod browser_compression;
mod browser_sse;
mod call_route;
// The chat example's application, run in-process by the browser test.
#[path = "../../examples/chat/app.rs"]
mod chat_app;
mod cli;
mod cluster;
mod compression;
mod control;
mod control_fast;
mod control_limits;
mod credentials;
mod fanout;
mod h2raw;
mod handle;
mod handshake;
mod history;
mod jetstream;
mod js_client;
mod lifecycle;
mod messages;
mod outbox;
mod presence;
mod presence_events;
mod probes;
mod proxies;
mod redis_cluster;
mod setup;
mod sharded;
mod shutdown;
mod sse;
mod support;
mod tls;
mod users;
