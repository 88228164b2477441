//! Client messages handled by application services over the control plane's `Handle` streams.
//!
//! A stream joins a *group* and names the actions it handles. A message goes to one member of
//! each group that handles its action (round robin, skipping members whose send buffer is
//! full); the first reply wins and goes back to the socket. Members that ask for lifecycle
//! events also get one `$connect` and one `$disconnect` message per socket, per group, and
//! `$occupied` / `$vacated` per change of a channel whose namespace enables occupancy.
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
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{Outcome, Request};
use crate::credentials::Digest;
use crate::{
    domain::Json,
    handoff::{Arriving, Delivery, Forwarded, HandlerReply, LocalEnd, LocalGroup, Outbound},
    protocol::{Body, Reply},
};

/// Deliveries buffered per member before it counts as full.
pub(crate) const MEMBER_BUFFER: usize = 1024;

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
pub(crate) struct Remote {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Groups and in-flight deliveries; short critical sections, never held across an await.
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Members that asked for lifecycle events, so a node with none skips building them.
    lifecycle_members: AtomicUsize,
    timeout: Duration,
    /// Cluster mode: the link to the bus, which offers messages to other nodes' streams.
    link: Option<LocalEnd>,
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<Box<str>, Group>,
    pending: HashMap<u64, Awaiting>,
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
struct Awaiting {
    member: u64,
    slot: Arc<Slot>,
}

/// The reply slot shared by the copies of one message (one per group).
#[derive(Debug)]
struct Slot {
    reply: Mutex<Option<ReplyTo>>,
    copies: Mutex<Vec<u64>>,
}

/// Where a reply goes: a socket on this node, or (cluster) back to the node that forwarded
/// the message. `None` means every copy died unanswered.
enum ReplyTo {
    Local(oneshot::Sender<HandlerReply>),
    Forwarded(oneshot::Sender<Option<HandlerReply>>),
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local(_) => "Local",
            Self::Forwarded(_) => "Forwarded",
        })
    }
}

impl Slot {
    fn new(to: ReplyTo) -> Arc<Self> {
        Arc::new(Self {
            reply: Mutex::new(Some(to)),
            copies: Mutex::new(Vec::new()),
        })
    }

    /// Answers once; later answers are ignored.
    fn resolve(&self, reply: Option<HandlerReply>) {
        match self.reply.lock().take() {
            Some(ReplyTo::Local(tx)) => {
                if let Some(reply) = reply {
                    let _ = tx.send(reply);
                }
            }
            Some(ReplyTo::Forwarded(back)) => {
                let _ = back.send(reply);
            }
            None => {}
        }
    }
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
    /// An empty registry whose deliveries wait at most `timeout` for a reply; in cluster
    /// mode, `link` reaches the streams of other nodes.
    pub(crate) fn new(timeout: Duration, link: Option<LocalEnd>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                lifecycle_members: AtomicUsize::new(0),
                timeout,
                link,
            }),
        }
    }

    /// The streams here changed (joined or left): tell the bus, which advertises the groups.
    fn changed(&self) {
        if let Some(link) = &self.shared.link {
            link.groups.send_replace(self.local_groups());
        }
    }

    /// Hands `outbound` to the bus without waiting; `false` when the bus is gone or behind.
    fn to_bus(&self, outbound: Outbound) -> bool {
        let Some(link) = &self.shared.link else {
            return false;
        };
        match link.outbound.try_send(outbound) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("cluster bus behind: a Handle message for other nodes was refused");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The groups with streams on this node.
    pub(crate) fn local_groups(&self) -> Vec<LocalGroup> {
        let state = self.shared.state.lock();
        state
            .groups
            .iter()
            .map(|(name, group)| {
                let mut actions: Vec<Box<str>> = group
                    .members
                    .iter()
                    .flat_map(|m| m.actions.iter().cloned())
                    .collect();
                actions.sort();
                actions.dedup();
                LocalGroup {
                    name: name.clone(),
                    actions,
                    lifecycle: group.members.iter().any(|m| m.lifecycle),
                }
            })
            .collect()
    }

    /// Hands a message forwarded by another node to a stream of its group here. Its reply
    /// sender gets the reply, or `None` at once when no stream of the group here takes it (or
    /// later, when the stream that took it ends first).
    pub(crate) fn deliver_forwarded(&self, inbound: Arriving) {
        let Arriving {
            group,
            mut delivery,
            reply,
        } = inbound;
        let mut state = self.shared.state.lock();
        let State { groups, pending } = &mut *state;
        let Some(group) = groups.get_mut(&group) else {
            let _ = reply.send(None);
            return;
        };
        if delivery.is_lifecycle() {
            group.offer(&delivery, |m| m.lifecycle);
            return;
        }
        delivery.delivery_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let action = delivery.action.clone();
        match group.offer(&delivery, |m| m.actions.contains(&*action)) {
            Offer::Sent(member) => {
                let slot = Slot::new(ReplyTo::Forwarded(reply));
                slot.copies.lock().push(delivery.delivery_id);
                pending.insert(delivery.delivery_id, Awaiting { member, slot });
            }
            _ => {
                let _ = reply.send(None);
            }
        }
    }

    /// Adds a member to `group` handling `actions`. Returns its membership and the receiver
    /// of its deliveries.
    pub(crate) fn join(
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
        if lifecycle {
            self.shared
                .lifecycle_members
                .fetch_add(1, Ordering::Relaxed);
        }
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
        self.changed();
        Ok((
            Member {
                id,
                group: group.into(),
                remote: self.clone(),
            },
            rx,
        ))
    }

    /// Offers a client message to every group handling its action: one stream of each group
    /// with streams here, and in a cluster, the groups elsewhere through the forwarder.
    pub(crate) fn handle(&self, request: Request) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let slot = Slot::new(ReplyTo::Local(tx));
        let mut delivery = Delivery {
            delivery_id: 0,
            connection_id: request.socket.connection_id.clone(),
            digest: Some(request.socket.digest),
            action: request.action.clone(),
            id: request.id.clone(),
            json: request.text.as_str().into(),
        };
        let (mut sent, mut busy, mut here) = (Vec::new(), false, Vec::new());
        {
            let mut state = self.shared.state.lock();
            let State { groups, pending } = &mut *state;
            for (name, group) in groups.iter_mut() {
                delivery.delivery_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                match group.offer(&delivery, |m| m.actions.contains(&*request.action)) {
                    Offer::Sent(member) => {
                        pending.insert(
                            delivery.delivery_id,
                            Awaiting {
                                member,
                                slot: slot.clone(),
                            },
                        );
                        sent.push(delivery.delivery_id);
                        here.push(name.clone());
                    }
                    Offer::Busy => {
                        busy = true;
                        here.push(name.clone());
                    }
                    Offer::NotHandled => {}
                }
            }
        }
        delivery.delivery_id = 0;
        let forward = self.shared.link.is_some().then(|| {
            let (outcome, rx) = oneshot::channel();
            let sent = self.to_bus(Outbound::Forward {
                delivery,
                exclude: here,
                outcome,
            });
            let forwarded: ForwardFuture = Box::pin(async move {
                match rx.await {
                    Ok(forwarded) if sent => forwarded,
                    _ => Forwarded::Failed,
                }
            });
            forwarded
        });
        if sent.is_empty() && forward.is_none() {
            return Outcome::Reply(if busy {
                request.reply(503, "handlers busy")
            } else {
                request.reply(404, "unknown action")
            });
        }
        let local_pending = !sent.is_empty();
        *slot.copies.lock() = sent;
        let remote = self.clone();
        Outcome::Pending(Box::pin(async move {
            let reply = remote.await_reply(slot, rx, local_pending, forward).await;
            let reply = match reply {
                Ok(reply) => Reply {
                    id: request.id.clone(),
                    status: reply.status,
                    headers: reply.headers,
                    body: reply
                        .body
                        .map_or_else(|| Body::Json(Json::null()), Body::Json),
                },
                Err(Unanswered::TimedOut) => request.reply(504, "handler timed out"),
                Err(Unanswered::Ended) => {
                    request.reply(503, "handler stream ended before replying")
                }
                Err(Unanswered::NotHandled) if busy => request.reply(503, "handlers busy"),
                Err(Unanswered::NotHandled) => request.reply(404, "unknown action"),
            };
            Some(reply)
        }))
    }

    /// Waits for the first reply from the local copies or the forwarded ones.
    async fn await_reply(
        &self,
        slot: Arc<Slot>,
        mut local: oneshot::Receiver<HandlerReply>,
        mut local_pending: bool,
        forward: Option<ForwardFuture>,
    ) -> Result<HandlerReply, Unanswered> {
        let deadline = tokio::time::sleep(self.shared.timeout);
        tokio::pin!(deadline);
        let mut forward_pending = forward.is_some();
        let mut forward = forward.unwrap_or_else(|| Box::pin(std::future::pending()));
        let mut ended = false;
        while local_pending || forward_pending {
            tokio::select! {
                reply = &mut local, if local_pending => match reply {
                    Ok(reply) => return Ok(reply),
                    Err(_) => {
                        local_pending = false;
                        ended = true;
                    }
                },
                outcome = &mut forward, if forward_pending => {
                    forward_pending = false;
                    match outcome {
                        Forwarded::Reply(reply) => {
                            self.forget(&slot);
                            return Ok(reply);
                        }
                        Forwarded::Failed => ended = true,
                        Forwarded::NoGroups => {}
                    }
                }
                _ = &mut deadline => {
                    self.forget(&slot);
                    return Err(Unanswered::TimedOut);
                }
            }
        }
        Err(if ended {
            Unanswered::Ended
        } else {
            Unanswered::NotHandled
        })
    }

    /// Takes a member's reply. A reply to a delivery that is no longer pending (answered by
    /// another group, or timed out) is ignored.
    pub(crate) fn reply(&self, member: &Member, reply: HandlerReply) -> Result<(), MemberError> {
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
        slot.resolve(Some(reply));
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

    /// Whether a lifecycle event may reach anyone: a stream here asked for them, or other
    /// nodes' streams may have (cluster mode).
    pub(crate) fn wants_lifecycle(&self) -> bool {
        self.shared.link.is_some() || self.shared.lifecycle_members.load(Ordering::Relaxed) > 0
    }

    /// Tells one member of each group that asked for them that a socket opened or closed, or
    /// a channel was occupied or vacated (no connection id, no digest).
    pub(crate) fn lifecycle(
        &self,
        action: &'static str,
        connection_id: &str,
        digest: Option<Digest>,
        detail: &str,
    ) {
        let delivery = Delivery {
            delivery_id: 0,
            connection_id: connection_id.into(),
            digest,
            action: action.into(),
            id: None,
            json: detail.into(),
        };
        let mut here = Vec::new();
        {
            let mut state = self.shared.state.lock();
            for (name, group) in state.groups.iter_mut() {
                match group.offer(&delivery, |m| m.lifecycle) {
                    Offer::Busy => {
                        tracing::warn!(group = %name, action, "lifecycle event dropped: handler streams full");
                        here.push(name.clone());
                    }
                    Offer::Sent(_) => here.push(name.clone()),
                    Offer::NotHandled => {}
                }
            }
        }
        if self.shared.link.is_some() {
            self.to_bus(Outbound::Event {
                delivery,
                exclude: here,
            });
        }
    }

    fn leave(&self, member: &Member) {
        let mut orphans = Vec::new();
        {
            let mut state = self.shared.state.lock();
            if let Some(group) = state.groups.get_mut(&member.group) {
                if group
                    .members
                    .iter()
                    .any(|m| m.id == member.id && m.lifecycle)
                {
                    self.shared
                        .lifecycle_members
                        .fetch_sub(1, Ordering::Relaxed);
                }
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
                drop(copies);
                // No other group holds a copy: the message goes unanswered (503).
                slot.resolve(None);
            }
        }
        self.changed();
    }
}

/// What offering a message to other nodes will come to.
type ForwardFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Forwarded> + Send>>;

/// Why a message got no reply.
enum Unanswered {
    TimedOut,
    Ended,
    NotHandled,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.remote.leave(self);
    }
}
