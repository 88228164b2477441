//! The single-node bus: every operation goes to this node's [`Registry`].

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::{AttachError, Bus, HistoryQuery, Page, PushTicket};
use crate::{
    credentials::{Credentials, Digest, Verified},
    domain::User,
    domain::{Channel, Json, Position},
    error::{Close, Error},
    protocol::{Frame, Recover},
    registry::{Conn, Ended, Ending, Listener, Present, Pushed, Registry, Wants},
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
    async fn save_anchor(
        &self,
        digest: &Digest,
        number: u64,
        positions: &str,
    ) -> Result<(), Error> {
        self.registry.save_anchor(digest, number, positions)
    }

    async fn is_live(&self, digest: &Digest) -> Result<bool, Error> {
        Ok(self.registry.is_live(digest))
    }

    async fn load_anchor(&self, digest: &Digest, number: u64) -> Result<Option<String>, Error> {
        Ok(self.registry.load_anchor(digest, number))
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    async fn issue(
        &self,
        ttl: Option<Duration>,
        user: Option<&User>,
    ) -> Result<Credentials, Error> {
        self.registry.issue(ttl, user)
    }

    async fn user_digests(&self, user: &str) -> Result<Vec<Digest>, Error> {
        Ok(self.registry.user_digests(user))
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

    async fn submit(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Result<PushTicket, Error> {
        let pushed = self.registry.push(channels, json, key)?;
        Ok(PushTicket::Ready(Some(Ok(pushed))))
    }

    fn push_now(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Option<Result<Pushed, Error>> {
        Some(self.registry.push(channels, json, key))
    }

    async fn presence(&self, channel: &Channel) -> Result<Vec<Present>, Error> {
        Ok(self.registry.presence(channel))
    }

    async fn presence_stats(&self, channel: &Channel) -> Result<(u64, u64), Error> {
        Ok(self.registry.presence_stats(channel))
    }

    async fn history(&self, channel: &Channel, query: &HistoryQuery) -> Result<Page, Error> {
        self.registry.history(
            channel,
            query.epoch.as_deref(),
            query.from,
            query.limit,
            query.reverse,
        )
    }

    async fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        wants: Wants,
    ) -> Result<Listener, Error> {
        self.registry
            .listen(channels, since, &HashMap::new(), wants)
    }

    async fn attach(
        &self,
        verified: &Verified,
        connection_id: &str,
        recover: Option<&Recover>,
    ) -> Result<Arc<Conn>, AttachError> {
        Ok(self.registry.attach(verified, connection_id, recover)?)
    }

    fn detach(&self, conn: &Conn, ending: Ending, _: Option<&Ended>) {
        self.registry.detach(conn, ending);
    }
}
