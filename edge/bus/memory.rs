//! The single-node bus: every operation goes to this node's [`Registry`].

use std::{sync::Arc, time::Duration};

use super::{AttachError, Bus};
use crate::{
    credentials::{Credentials, Digest, Verified},
    error::{Close, Error},
    protocol::{Channel, Frame},
    registry::{Conn, Ending, Registry},
};

/// The bus of a node on its own.
#[derive(Debug)]
pub(crate) struct Memory {
    registry: Registry,
}

impl Memory {
    pub(crate) fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

#[async_trait::async_trait]
impl Bus for Memory {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    async fn issue(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        self.registry.issue(ttl)
    }

    async fn subscribe(
        &self,
        digest: &Digest,
        channels: &[Channel],
        add: bool,
    ) -> Result<bool, Error> {
        if add {
            self.registry.subscribe(digest, channels)
        } else {
            self.registry.unsubscribe(digest, channels)
        }
    }

    async fn send(&self, digest: &Digest, frame: Frame) -> Result<bool, Error> {
        self.registry.send(digest, &frame)
    }

    async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        self.registry.disconnect(digest, close)
    }

    async fn listen(&self, _channels: &[Channel]) {}

    async fn attach(&self, verified: &Verified) -> Result<Arc<Conn>, AttachError> {
        Ok(self.registry.attach(verified)?)
    }

    fn detach(&self, conn: &Conn, ending: Ending) {
        self.registry.detach(conn, ending);
    }
}
