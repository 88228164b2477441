//! Client messages handled by application services over the control plane's `Handle` streams.
//!
//! A stream joins a *group* and names the actions it handles. A message goes to one member of
//! each group that handles its action (round robin, skipping members whose send buffer is
//! full); the first reply wins and goes back to the socket. Members that ask for lifecycle
//! events also get one `$connect` and one `$disconnect` message per socket, per group.
//!
//! | outcome | client gets |
//! | --- | --- |
//! | no group handles the action | 404 |
//! | every member's buffer is full | 503 |
//! | every stream holding a copy ended first | 503 |
//! | no reply within the handler timeout | 504 |
//!
//! This module knows nothing of gRPC: `control/handle.rs` adapts a stream to a [`Member`].

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{Outcome, Request, Socket};
use crate::{
    credentials::Digest,
    protocol::{Body, Json, Reply},
};

/// Deliveries buffered per member before it counts as full.
pub const MEMBER_BUFFER: usize = 1024;

/// Reserved action of connect events.
pub const CONNECT: &str = "$connect";
/// Reserved action of disconnect events.
pub const DISCONNECT: &str = "$disconnect";

/// A message for a `Handle` stream.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Names the delivery in the reply; 0 for lifecycle events (no reply expected).
    pub delivery_id: u64,
    /// The socket's connection id.
    pub connection_id: Box<str>,
    /// The socket's digest.
    pub digest: Digest,
    /// The action (or `$connect` / `$disconnect`).
    pub action: Box<str>,
    /// The client's id as JSON text, if any.
    pub id: Option<Box<RawValue>>,
    /// The whole client message (for lifecycle events, a small JSON object).
    pub json: Box<str>,
}

/// A member's answer to one delivery.
#[derive(Debug)]
pub struct RemoteReply {
    /// The delivery it answers.
    pub delivery_id: u64,
    /// HTTP-like status, 100..=599.
    pub status: u16,
    /// Reply headers.
    pub headers: Vec<(String, String)>,
    /// Reply body (`None`: null).
    pub body: Option<Json>,
}

/// What a member got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    /// A registration the gateway cannot take.
    #[error("{0}")]
    BadRegistration(String),
    /// A reply to a delivery that went to another stream.
    #[error("delivery {0} was not sent to this stream")]
    NotYours(u64),
}

/// The registry of `Handle` streams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Remote {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Groups and in-flight deliveries; short critical sections, never held across an await.
    state: Mutex<State>,
    next_id: AtomicU64,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<Box<str>, Group>,
    pending: HashMap<u64, Pending>,
}

#[derive(Debug, Default)]
struct Group {
    members: Vec<MemberEntry>,
    next: usize,
}

#[derive(Debug)]
struct MemberEntry {
    id: u64,
    actions: HashSet<Box<str>>,
    lifecycle: bool,
    tx: mpsc::Sender<Delivery>,
}

#[derive(Debug)]
struct Pending {
    member: u64,
    slot: Arc<Slot>,
}

/// The reply slot shared by the copies of one message (one per group).
#[derive(Debug)]
struct Slot {
    reply: Mutex<Option<oneshot::Sender<RemoteReply>>>,
    copies: Mutex<Vec<u64>>,
}

/// A stream's membership; leaving (on drop) answers its in-flight deliveries with 503.
#[derive(Debug)]
pub struct Member {
    id: u64,
    group: Box<str>,
    remote: Remote,
}

impl Group {
    /// Sends `delivery` to the next member handling `action` (or asking for lifecycle events)
    /// whose buffer has room. Returns that member's id.
    fn offer(&mut self, delivery: &Delivery, wants: impl Fn(&MemberEntry) -> bool) -> Offer {
        let n = self.members.len();
        let mut any = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            let member = &self.members[i];
            if !wants(member) {
                continue;
            }
            any = true;
            if member.tx.try_send(delivery.clone()).is_ok() {
                self.next = (i + 1) % n;
                return Offer::Sent(member.id);
            }
        }
        if any {
            Offer::Busy
        } else {
            Offer::NotHandled
        }
    }
}

enum Offer {
    Sent(u64),
    Busy,
    NotHandled,
}

impl Remote {
    /// An empty registry whose deliveries wait at most `timeout` for a reply.
    pub fn new(timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                timeout,
            }),
        }
    }

    /// Adds a member to `group` handling `actions`. Returns its membership and the receiver
    /// of its deliveries.
    pub fn join(
        &self,
        group: &str,
        actions: Vec<String>,
        lifecycle: bool,
    ) -> Result<(Member, mpsc::Receiver<Delivery>), MemberError> {
        if group.is_empty() || group.len() > 255 {
            return Err(MemberError::BadRegistration(
                "group must be 1 to 255 bytes".into(),
            ));
        }
        if actions.is_empty() && !lifecycle {
            return Err(MemberError::BadRegistration(
                "register at least one action or lifecycle events".into(),
            ));
        }
        for action in &actions {
            let ok = !action.is_empty()
                && action.len() <= 255
                && !action.starts_with('$')
                && action.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(MemberError::BadRegistration(format!(
                    "invalid action {action:?}: 1 to 255 bytes of printable ASCII, not starting with $"
                )));
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(MEMBER_BUFFER);
        self.shared
            .state
            .lock()
            .groups
            .entry(group.into())
            .or_default()
            .members
            .push(MemberEntry {
                id,
                actions: actions.into_iter().map(Into::into).collect(),
                lifecycle,
                tx,
            });
        Ok((
            Member {
                id,
                group: group.into(),
                remote: self.clone(),
            },
            rx,
        ))
    }

    /// Whether any member handles `action`.
    pub fn handles(&self, action: &str) -> bool {
        self.shared
            .state
            .lock()
            .groups
            .values()
            .any(|g| g.members.iter().any(|m| m.actions.contains(action)))
    }

    /// Offers a client message to every group handling its action.
    pub fn handle(&self, request: Request) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(Slot {
            reply: Mutex::new(Some(tx)),
            copies: Mutex::new(Vec::new()),
        });
        let mut delivery = Delivery {
            delivery_id: 0,
            connection_id: request.socket.connection_id.clone(),
            digest: request.socket.digest,
            action: request.action.clone(),
            id: request.id.clone(),
            json: request.text.as_str().into(),
        };
        let (mut sent, mut busy) = (Vec::new(), false);
        {
            let mut state = self.shared.state.lock();
            let State { groups, pending } = &mut *state;
            for group in groups.values_mut() {
                delivery.delivery_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                match group.offer(&delivery, |m| m.actions.contains(&*request.action)) {
                    Offer::Sent(member) => {
                        pending.insert(
                            delivery.delivery_id,
                            Pending {
                                member,
                                slot: slot.clone(),
                            },
                        );
                        sent.push(delivery.delivery_id);
                    }
                    Offer::Busy => busy = true,
                    Offer::NotHandled => {}
                }
            }
        }
        if sent.is_empty() {
            return Outcome::Reply(if busy {
                request.reply(503, "handlers busy")
            } else {
                request.reply(404, "unknown action")
            });
        }
        *slot.copies.lock() = sent;
        let remote = self.clone();
        Outcome::Pending(Box::pin(async move {
            let reply = match tokio::time::timeout(remote.shared.timeout, rx).await {
                Ok(Ok(reply)) => Reply {
                    id: request.id.clone(),
                    status: reply.status,
                    headers: reply.headers,
                    body: reply
                        .body
                        .map_or_else(|| Body::Json(Json::null()), Body::Json),
                },
                Ok(Err(_)) => request.reply(503, "handler stream ended before replying"),
                Err(_) => {
                    remote.forget(&slot);
                    request.reply(504, "handler timed out")
                }
            };
            Some(reply)
        }))
    }

    /// Takes a member's reply. A reply to a delivery that is no longer pending (answered by
    /// another group, or timed out) is ignored.
    pub fn reply(&self, member: &Member, reply: RemoteReply) -> Result<(), MemberError> {
        let slot = {
            let state = self.shared.state.lock();
            match state.pending.get(&reply.delivery_id) {
                None => {
                    tracing::debug!(
                        delivery_id = reply.delivery_id,
                        "late or duplicate handler reply ignored"
                    );
                    return Ok(());
                }
                Some(p) if p.member != member.id => {
                    return Err(MemberError::NotYours(reply.delivery_id))
                }
                Some(p) => p.slot.clone(),
            }
        };
        self.forget(&slot);
        if let Some(tx) = slot.reply.lock().take() {
            let _ = tx.send(reply);
        }
        Ok(())
    }

    /// Removes every copy of a message from the pending table.
    fn forget(&self, slot: &Slot) {
        let copies = std::mem::take(&mut *slot.copies.lock());
        let mut state = self.shared.state.lock();
        for id in copies {
            state.pending.remove(&id);
        }
    }

    /// Tells one member of each group that asked for them that a socket opened or closed.
    pub fn lifecycle(&self, action: &'static str, socket: &Socket, detail: &str) {
        let delivery = Delivery {
            delivery_id: 0,
            connection_id: socket.connection_id.clone(),
            digest: socket.digest,
            action: action.into(),
            id: None,
            json: detail.into(),
        };
        let mut state = self.shared.state.lock();
        for (name, group) in state.groups.iter_mut() {
            if let Offer::Busy = group.offer(&delivery, |m| m.lifecycle) {
                tracing::warn!(group = %name, action, "lifecycle event dropped: handler streams full");
            }
        }
    }

    fn leave(&self, member: &Member) {
        let mut orphans = Vec::new();
        {
            let mut state = self.shared.state.lock();
            if let Some(group) = state.groups.get_mut(&member.group) {
                group.members.retain(|m| m.id != member.id);
                if group.members.is_empty() {
                    state.groups.remove(&member.group);
                }
            }
            state.pending.retain(|id, p| {
                if p.member == member.id {
                    orphans.push((*id, p.slot.clone()));
                    false
                } else {
                    true
                }
            });
        }
        for (id, slot) in orphans {
            let mut copies = slot.copies.lock();
            let before = copies.len();
            copies.retain(|c| *c != id);
            // Only when this was the last copy still out (a reply being delivered right now
            // has already taken the copies).
            if copies.len() < before && copies.is_empty() {
                // No other group holds a copy: dropping the sender answers 503.
                slot.reply.lock().take();
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.remote.leave(self);
    }
}
