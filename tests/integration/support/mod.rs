//! The harness, by job: [`gateway`] (the node under test and its clients), [`ws`] (a
//! WebSocket client), [`upstream`] (a `call-route` application), [`process`] (the binary as a
//! process), [`pki`] (test certificates), [`net`] (networks that fail on purpose); and here,
//! waiting for events.

#![allow(dead_code, unreachable_pub)]

use std::{future::Future, time::Duration};

use channelgate::pb;

mod gateway;
mod net;
mod pki;
mod process;
mod raw_ws;
mod sources;
mod sse;
mod upstream;
mod ws;

pub use gateway::*;
pub use net::*;
pub use pki::*;
pub use process::*;
pub use raw_ws::*;
pub use sources::*;
pub use sse::*;
pub use upstream::*;
pub use ws::*;

/// How long any expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The next event of a `Listen` stream, failing the test after [`PATIENCE`].
pub async fn next_event(events: &mut tonic::Streaming<pb::ListenEvent>) -> pb::ListenEvent {
    tokio::time::timeout(PATIENCE, events.message())
        .await
        .expect("a Listen event in time")
        .expect("the Listen stream is fine")
        .expect("the Listen stream goes on")
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn wait_until<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
