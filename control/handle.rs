//! The streaming RPCs: `Listen` (pushes to channels, copied to an application instance) and
//! `Handle` (client messages to application services, their replies back to the socket).
//!
//! Both streams end when the node halts, so a drain never waits on them.

use std::pin::Pin;

use edge::{
    gateway::{Delivery, Listener, Member},
    Gateway,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::{Status, Streaming};

use crate::{convert, pb, status};

/// A boxed response stream.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `Listen` stream of `listener`: every push (and gap, and presence event it asked for),
/// then `RESOURCE_EXHAUSTED` if it fell behind.
pub(crate) fn listen(listener: Listener, gateway: &Gateway) -> BoxStream<pb::ListenEvent> {
    let events = futures_util::stream::unfold(Some(listener), |state| async move {
        let mut listener = state?;
        match listener.recv().await {
            Some(event) => Some((Ok(convert::listen_event(&event)), Some(listener))),
            None if listener.overflowed() => Some((
                Err(Status::resource_exhausted(
                    "listener fell behind and was dropped; pushes never wait for listeners",
                )),
                None,
            )),
            None => None,
        }
    });
    Box::pin(events.take_until(gateway.halted()))
}

/// Runs a `Handle` stream: takes the registration, then relays deliveries out and replies in.
pub(crate) async fn handle(
    gateway: &Gateway,
    mut inbound: Streaming<pb::HandleRequest>,
) -> Result<BoxStream<pb::ClientMessage>, Status> {
    let register = match inbound.message().await? {
        Some(pb::HandleRequest {
            kind: Some(pb::handle_request::Kind::Register(register)),
        }) => register,
        _ => {
            return Err(Status::invalid_argument(
                "a Handle stream must start with a Register message",
            ))
        }
    };
    let (member, deliveries) = gateway
        .join(&register.group, register.actions, register.lifecycle_events)
        .map_err(status::member)?;
    tracing::info!(group = %register.group, "Handle stream joined");

    // Replies come in on a task of their own; it owns the membership, so the member leaves
    // (and its in-flight deliveries get 503) when the inbound side ends or breaks a rule.
    // The outcome is sent before the member leaves; the deliveries end when it has left.
    let (failed_tx, failed_rx) = oneshot::channel::<Status>();
    let (replies, halted) = (gateway.clone(), gateway.halted());
    gateway.spawn(async move {
        let failure = tokio::select! {
            failure = relay_replies(&replies, &member, &mut inbound) => failure,
            _ = halted => None,
        };
        if let Some(status) = failure {
            let _ = failed_tx.send(status);
        }
        drop(member);
    });

    let out = futures_util::stream::unfold(
        (deliveries, Some(failed_rx)),
        |(mut deliveries, failed)| async move {
            let mut failed = failed?;
            tokio::select! {
                biased;
                status = &mut failed => status.ok().map(|s| (Err(s), (deliveries, None))),
                delivery = deliveries.recv() => match delivery {
                    Some(d) => Some((Ok(client_message(d)), (deliveries, Some(failed)))),
                    // The member left: the stream ends with the reply task's outcome, its
                    // error status when it refused something (never `OK` in its place).
                    None => failed.await.ok().map(|s| (Err(s), (deliveries, None))),
                },
            }
        },
    );
    Ok(Box::pin(out.take_until(gateway.halted())))
}

/// Takes replies until the stream ends (`None`) or sends something invalid (its status).
async fn relay_replies(
    gateway: &Gateway,
    member: &Member,
    inbound: &mut Streaming<pb::HandleRequest>,
) -> Option<Status> {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => return None,
        };
        let reply = match message.kind {
            Some(pb::handle_request::Kind::Reply(reply)) => reply,
            Some(pb::handle_request::Kind::Register(_)) => {
                return Some(Status::invalid_argument("Register may only be sent once"))
            }
            None => return Some(Status::invalid_argument("empty HandleRequest")),
        };
        let reply = match convert::remote_reply(reply) {
            Ok(reply) => reply,
            Err(status) => return Some(status),
        };
        if let Err(err) = gateway.reply(member, reply) {
            return Some(status::member(err));
        }
    }
}

fn client_message(d: Delivery) -> pb::ClientMessage {
    pb::ClientMessage {
        delivery_id: d.delivery_id,
        connection_id: d.connection_id.into(),
        digest: d.digest.map(|d| d.to_string()).unwrap_or_default(),
        action: d.action.into(),
        id: d.id.map(|id| id.get().to_owned()).unwrap_or_default(),
        json: d.json.into(),
    }
}
