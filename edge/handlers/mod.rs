//! Client-message handlers: the [`Handler`] trait and the [`Handlers`] table that routes each
//! client message to one by its `action`.
//!
//! Built in: `ping` (answered at once) and `call-route` ([`call_route`], an HTTP request to the
//! application). Any other action goes to the application services that registered for it over
//! the control plane's `Handle` streams ([`streams`]); with none, the client gets 404.
//!
//! A handler either answers at once ([`Outcome::Reply`]) or returns a future
//! ([`Outcome::Pending`]); the socket runs pending futures as tracked tasks, at most
//! `max_inflight` per socket (beyond that the client gets 429), and queues their replies like
//! any other frame, so replies may come back out of order and are matched by `id`.

pub(crate) mod call_route;
pub(crate) mod streams;

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::AtomicUsize, Arc},
};

use prometheus::Histogram;
use serde_json::value::RawValue;

use crate::{
    credentials::Digest,
    metrics::Metrics,
    protocol::{Frame, Reply},
};

/// A boxed handler future.
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Option<Reply>> + Send + 'static>>;

/// Who sent a message: the socket's identity, shared by all its messages.
#[derive(Debug)]
pub(crate) struct Socket {
    /// The public connection id.
    pub connection_id: Box<str>,
    /// The digest that addresses the socket on the control plane.
    pub digest: Digest,
    /// The client's address.
    pub peer: SocketAddr,
    /// The upgrade request's `Cookie` header, as the browser sent it (it may contain the socket
    /// key cookie: handlers that forward it must strip that). Boxed: most sockets have none,
    /// and inline it is 40 bytes of every socket's identity.
    pub cookies: Option<Box<http::HeaderValue>>,
    /// Messages of this socket being handled right now (kept by the connection task).
    pub(crate) inflight: AtomicUsize,
}

impl Socket {
    /// A socket's identity.
    pub(crate) fn new(
        connection_id: Box<str>,
        digest: Digest,
        peer: SocketAddr,
        cookies: Option<http::HeaderValue>,
    ) -> Self {
        Self {
            connection_id,
            digest,
            peer,
            cookies: cookies.map(Box::new),
            inflight: AtomicUsize::new(0),
        }
    }
}

/// One client message, handed to a handler.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// The action name.
    pub action: Box<str>,
    /// The client's id (a number or a string), as JSON text.
    pub id: Option<Box<RawValue>>,
    /// The whole message, as the client sent it.
    pub text: Frame,
    /// The sender.
    pub socket: Arc<Socket>,
}

impl Request {
    /// A reply to this request with a text body.
    pub(crate) fn reply(&self, status: u16, body: impl Into<String>) -> Reply {
        Reply::text(self.id.clone(), status, body)
    }
}

/// What a handler does with a message.
pub(crate) enum Outcome {
    /// Answer at once.
    Reply(Reply),
    /// Answer when the future resolves (`None`: no reply).
    Pending(BoxFuture),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reply(r) => f.debug_tuple("Reply").field(r).finish(),
            Self::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Handles the client messages of one or more actions.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Handles one message. Must not block: slow work belongs in [`Outcome::Pending`].
    fn handle(&self, request: Request) -> Outcome;
}

impl<F> Handler for F
where
    F: Fn(Request) -> Outcome + Send + Sync + 'static,
{
    fn handle(&self, request: Request) -> Outcome {
        self(request)
    }
}

/// The action table. Built-in handlers take precedence over `Handle` streams.
/// It also times the handlers that answer later (`call-route` and `Handle` round trips), so
/// the socket's task knows no handler by name.
#[derive(Clone)]
pub(crate) struct Handlers {
    table: HashMap<Box<str>, Entry>,
    remote: streams::Remote,
    /// Round trips of `Handle` streams.
    handle_seconds: Histogram,
}

/// A handler, and the histogram its pending replies are timed in (if any).
#[derive(Clone)]
struct Entry {
    handler: Arc<dyn Handler>,
    latency: Option<Histogram>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers")
            .field("actions", &self.table.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Handlers {
    /// The built-in table: `ping`, `call-route`, and `Handle` streams for everything else,
    /// timed into `metrics`.
    pub(crate) fn new(
        call_route: call_route::CallRoute,
        remote: streams::Remote,
        metrics: &Metrics,
    ) -> Self {
        let mut handlers = Self {
            table: HashMap::new(),
            remote,
            handle_seconds: metrics.handle_seconds.clone(),
        };
        handlers.insert("ping", |request: Request| {
            Outcome::Reply(request.reply(200, "pong"))
        });
        handlers.table.insert(
            call_route::ACTION.into(),
            Entry {
                handler: Arc::new(call_route),
                latency: Some(metrics.call_route_seconds.clone()),
            },
        );
        handlers
    }

    /// Adds (or replaces) the handler of `action`.
    pub(crate) fn insert(&mut self, action: &str, handler: impl Handler) {
        let entry = Entry {
            handler: Arc::new(handler),
            latency: None,
        };
        self.table.insert(action.into(), entry);
    }

    /// Whether `action` is handled by the gateway itself (and so cannot be claimed by a
    /// `Handle` stream).
    pub(crate) fn is_builtin(&self, action: &str) -> bool {
        self.table.contains_key(action)
    }

    /// The `Handle` stream registry.
    pub(crate) fn remote(&self) -> &streams::Remote {
        &self.remote
    }

    /// Routes a message to its handler. A reply that comes later is timed in the handler's
    /// histogram.
    pub(crate) fn dispatch(&self, request: Request) -> Outcome {
        let (outcome, latency) = match self.table.get(&*request.action) {
            Some(entry) => (entry.handler.handle(request), entry.latency.as_ref()),
            None => (self.remote.handle(request), Some(&self.handle_seconds)),
        };
        match (outcome, latency) {
            (Outcome::Pending(future), Some(histogram)) => {
                let histogram = histogram.clone();
                Outcome::Pending(Box::pin(async move {
                    let timer = histogram.start_timer();
                    let reply = future.await;
                    timer.observe_duration();
                    reply
                }))
            }
            (outcome, _) => outcome,
        }
    }

    /// Whether lifecycle events may reach a stream (else building them is skipped).
    pub(crate) fn wants_lifecycle(&self) -> bool {
        self.remote.wants_lifecycle()
    }

    /// Tells the `Handle` streams that asked for lifecycle events that a socket opened:
    /// `{"resumed": bool, "user": ...}` (resumed: the credentials had a socket before, and
    /// this one took over within the reconnect grace; no `$disconnect` came between).
    pub(crate) fn connected(&self, socket: &Socket, resumed: bool, user: Option<&str>) {
        let detail = serde_json::json!({"resumed": resumed, "user": user}).to_string();
        self.remote.lifecycle(
            crate::handoff::CONNECT,
            &socket.connection_id,
            Some(socket.digest),
            &detail,
        );
    }

    /// Tells them what the registry queued: that credentials ended for good (the one final
    /// `$disconnect` of a connection), or that a channel was occupied or vacated
    /// (`{"channel": ...}`).
    pub(crate) fn lifecycle(&self, event: &crate::registry::Lifecycle) {
        if !self.wants_lifecycle() {
            return;
        }
        match event {
            crate::registry::Lifecycle::Ended(ended) => self.remote.lifecycle(
                crate::handoff::DISCONNECT,
                &ended.connection_id,
                Some(ended.digest),
                &ended.json(),
            ),
            crate::registry::Lifecycle::Occupancy { channel, occupied } => {
                let detail = serde_json::json!({ "channel": channel.as_str() }).to_string();
                let action = if *occupied {
                    crate::handoff::OCCUPIED
                } else {
                    crate::handoff::VACATED
                };
                self.remote.lifecycle(action, "", None, &detail);
            }
        }
    }
}
