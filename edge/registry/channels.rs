//! The channels room: the index of live subscribers per channel, and delivery. A push is
//! checked and encoded once, then the same bytes are queued to every subscriber of the
//! channel in one short critical section, without waiting on any socket; listeners and (in
//! cluster mode) the bus get it after, in the same order.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

use super::{
    check_channel_count,
    sessions::{Session, State},
    Conn, Registry, Relay,
};
use crate::{
    credentials::Digest,
    error::Error,
    fanout::{Backlog, Enqueued},
    protocol::{push_frame, Channel, Frame},
};

/// The live sockets subscribed to one channel, by connection serial.
pub(super) type Subscribers = Mutex<HashMap<u64, Arc<Conn>>>;

impl Registry {
    pub(super) fn add_subscriber(&self, channel: &Channel, conn: &Arc<Conn>) {
        let mut created = false;
        let entry = self
            .shared
            .channels
            .entry(channel.clone())
            .or_insert_with(|| {
                created = true;
                Arc::default()
            });
        entry.lock().insert(conn.serial, conn.clone());
        drop(entry);
        if created {
            self.interest_changed(channel);
        }
    }

    pub(super) fn remove_subscriber(&self, channel: &Channel, serial: u64) {
        if let Some(subscribers) = self.shared.channels.get(channel) {
            subscribers.lock().remove(&serial);
        }
        let removed = self
            .shared
            .channels
            .remove_if(channel, |_, subscribers| subscribers.lock().is_empty());
        if removed.is_some() {
            self.interest_changed(channel);
        }
    }

    /// Checks a push's JSON and delivers it to every channel's sockets and listeners. Returns
    /// the number of sockets it was queued to.
    pub fn push(&self, channels: &[Channel], json: &str) -> Result<u64, Error> {
        check_channel_count(channels)?;
        let json = self.check_payload(json)?;
        let mut shared_json: Option<Arc<str>> = None;
        let mut queued = 0;
        for channel in channels {
            let frame = push_frame(channel, &json);
            let payload_at = frame.len() - json.as_str().len() - 1;
            queued += self.deliver(channel, &frame, Some(payload_at));
            if !self.shared.listeners.is_empty() {
                let text = shared_json.get_or_insert_with(|| json.as_str().into());
                self.notify_listeners(channel, text);
            }
        }
        Ok(queued)
    }

    /// Delivers a push another node accepted: the frame as it was encoded there, to local
    /// subscribers and listeners.
    pub fn deliver_relayed(&self, relay: &Relay) -> u64 {
        let queued = self.deliver(&relay.channel, &relay.frame, None);
        if !self.shared.listeners.is_empty() {
            let payload = &relay.frame[relay.payload_at..relay.frame.len() - 1];
            self.notify_listeners(&relay.channel, &Arc::from(payload));
        }
        queued
    }

    /// Queues an encoded frame to every live subscriber of `channel`, in one critical section
    /// per channel, so all subscribers see pushes to a channel in the same order; in cluster
    /// mode a push accepted here (`relay_payload_at` set) is handed to the bus in that same
    /// order. Never waits.
    fn deliver(&self, channel: &Channel, frame: &Frame, relay_payload_at: Option<usize>) -> u64 {
        let metrics = &self.shared.metrics;
        metrics.pushes.inc();
        let relay = |payload_at| {
            let Some(hooks) = &self.shared.cluster else {
                return;
            };
            let relay = Relay {
                channel: channel.clone(),
                frame: frame.clone(),
                payload_at,
            };
            if hooks.relay.try_send(relay).is_err() {
                metrics.relay_dropped.inc();
                tracing::warn!(%channel, "cross-node push dropped: the cluster bus is not keeping up");
            }
        };
        let Some(subscribers) = self.shared.channels.get(channel).map(|s| s.clone()) else {
            if let Some(at) = relay_payload_at {
                relay(at);
            }
            return 0;
        };
        let limit = self.shared.limits.outbound_queue;
        let (mut queued, mut full, mut dropped) = (0u64, 0u64, 0u64);
        let subscribers = subscribers.lock();
        for conn in subscribers.values() {
            match conn.outbox.push_uncounted(frame, limit) {
                Enqueued::Queued => queued += 1,
                Enqueued::Full => full += 1,
                Enqueued::Closed => dropped += 1,
            }
        }
        self.shared.backlog.add(queued as usize * frame.len());
        if let Some(at) = relay_payload_at {
            relay(at);
        }
        drop(subscribers);
        metrics.deliveries.inc_by(queued);
        metrics.bytes_out.inc_by(queued * frame.len() as u64);
        if full > 0 {
            metrics.slow_closes.inc_by(full);
            tracing::debug!(%channel, sockets = full, "closing sockets as too slow: outbound queue full");
        }
        metrics.dropped.inc_by(dropped);
        queued
    }

    /// Queues an encoded frame (a `Send`) to `digest`'s socket. Returns whether it was queued
    /// to a live socket on this node; an unknown or ended digest is an error.
    pub fn send(&self, digest: &Digest, frame: &Frame) -> Result<bool, Error> {
        let conn = {
            let session = self.known_session(digest)?;
            match &session.state {
                State::Live(conn) => conn.clone(),
                _ => return Ok(false),
            }
        };
        Ok(self.queue_one(&conn, frame))
    }

    /// Queues `frame` to one socket, counting the outcome. Never waits.
    fn queue_one(&self, conn: &Conn, frame: &Frame) -> bool {
        let metrics = &self.shared.metrics;
        match conn.outbox.push(frame, self.shared.limits.outbound_queue) {
            Enqueued::Queued => {
                metrics.deliveries.inc();
                metrics.bytes_out.inc_by(frame.len() as u64);
                true
            }
            Enqueued::Full => {
                metrics.slow_closes.inc();
                false
            }
            Enqueued::Closed => {
                metrics.dropped.inc();
                false
            }
        }
    }

    /// Queues an encoded frame to `digest`'s socket if it is live here (a cluster `Send`, from
    /// this node or relayed from another). Returns whether it was queued.
    pub fn send_frame(&self, digest: &Digest, frame: &Frame) -> bool {
        let conn = match self.shared.sessions.get(digest).as_deref() {
            Some(Session {
                state: State::Live(conn),
                ..
            }) => conn.clone(),
            _ => return false,
        };
        self.queue_one(&conn, frame)
    }

    /// Bytes queued in every outbox of this node.
    pub fn backlog(&self) -> &Backlog {
        &self.shared.backlog
    }
}
