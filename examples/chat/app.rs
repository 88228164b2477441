//! The chat application service: an axum app that drives a channelgate node through its control
//! plane. `main.rs` runs it; the browser test mounts this file and runs it in-process.
//!
//! * `GET /` renders the page: it mints credentials with `IssueConnection` (subscribed to the room
//!   in the same call, before the page exists), puts the public connection id in
//!   `<body data-socket-connection-id>`, and hands the secret key to the browser as an
//!   `HttpOnly` cookie that page JavaScript cannot read.
//! * `POST /messages` (from the page, over the WebSocket with `call-route`; or plain HTTP) stores a
//!   message and pushes it to the room. `GET /messages` lists the recent ones.
//! * A `Handle` stream serves the client action `typing`: it pushes "X is typing" to the room.
//!   It reconnects with back-off when the gateway goes away.
//!
//! Who is who comes from the application's own records, never from the client: a session cookie
//! for the REST routes (call-route forwards the page's cookies), the socket's digest for `typing`.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};
use channelgate::client::Client;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The one room of this example.
pub(crate) const ROOM: &str = "chat:lobby";
/// Recent messages kept for `GET /messages`.
const HISTORY: usize = 50;
/// Longest message text, in characters.
const MAX_TEXT: usize = 500;
/// The socket key cookie's name (the gateway's `--key-cookie`, default `socket_key`).
const KEY_COOKIE: &str = "socket_key";
/// The application's own session cookie.
const SESSION_COOKIE: &str = "chat_session";

/// Where the app finds the gateway.
#[derive(Debug, Clone)]
pub(crate) struct ChatConfig {
    /// The node's control plane, e.g. `http://127.0.0.1:50051`.
    pub(crate) control: String,
    /// A bearer token for the control plane, when the node requires one.
    pub(crate) token: Option<String>,
    /// The WebSocket URL browsers connect to, e.g. `wss://rt.example.com/ws`. `None`: the page's
    /// own host name on `gateway_port` (so the key cookie, which is per host, reaches it).
    pub(crate) gateway_url: Option<String>,
    /// The gateway's client-plane port when `gateway_url` is `None`.
    pub(crate) gateway_port: u16,
}

#[derive(Debug)]
struct Chat {
    config: ChatConfig,
    control: Client,
    state: Mutex<Records>,
}

#[derive(Debug, Default)]
struct Records {
    /// Session cookie -> display name.
    sessions: HashMap<String, String>,
    /// Socket digest -> display name (for `typing`, which arrives over `Handle`).
    sockets: HashMap<String, String>,
    history: VecDeque<Value>,
    next_id: u64,
}

/// Serves the app on `listener` until `shutdown`; the `Handle` stream runs alongside.
pub(crate) async fn serve(
    listener: TcpListener,
    config: ChatConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Lazy: the app may start before the gateway does.
    let control = Client::builder(config.control.clone())
        .token_opt(config.token.clone())
        .connect_lazy()?;
    let chat = Arc::new(Chat {
        config,
        control,
        state: Mutex::new(Records::default()),
    });
    let handler = tokio::spawn(handle_typing(chat.clone(), shutdown.clone()));
    let app = Router::new()
        .route("/", get(page))
        .route("/messages", get(list).post(post))
        .route("/online", get(online))
        .with_state(chat);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    shutdown.cancel();
    handler.await?;
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
struct PageQuery {
    name: Option<String>,
}

/// The page: new credentials per render, subscribed to the room before the HTML goes out.
async fn page(
    State(chat): State<Arc<Chat>>,
    Query(query): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let name = clean_name(query.name.as_deref());
    // For the user: the gateway's presence then names them (a second tab is the same user).
    let issued = chat.control.issue_for(None, &[ROOM], &name, "").await;
    let creds = match issued {
        Ok(creds) => creds,
        Err(status) => {
            tracing::warn!(%status, "IssueConnection failed");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the gateway is not answering: {}\n", status.message()),
            )
                .into_response();
        }
    };
    let session = random_token();
    {
        let mut records = chat.state.lock();
        records.sessions.insert(session.clone(), name.clone());
        records.sockets.insert(creds.digest.clone(), name.clone());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let ws_url = chat.config.gateway_url.clone().unwrap_or_else(|| {
        let hostname = host_name(host);
        format!("ws://{hostname}:{}/ws", chat.config.gateway_port)
    });
    let script_url = script_url(&ws_url);
    let html = include_str!("page.html")
        .replace("{{connection_id}}", &escape(&creds.connection_id))
        .replace("{{socket_url}}", &escape(&ws_url))
        .replace("{{script_url}}", &escape(&script_url))
        .replace("{{name}}", &escape(&name));
    let secure = if ws_url.starts_with("wss:") {
        "; Secure"
    } else {
        ""
    };
    let mut response = Html(html).into_response();
    let cookies = response.headers_mut();
    // The key: HttpOnly (no script reads it), sent by the browser with the WebSocket upgrade.
    // Cookies are per host, not per port, so the gateway on the same host receives it; across
    // subdomains, add `Domain=example.com`.
    for cookie in [
        format!(
            "{KEY_COOKIE}={}; HttpOnly; SameSite=Lax; Path=/{secure}",
            creds.socket_key
        ),
        format!("{SESSION_COOKIE}={session}; HttpOnly; SameSite=Lax; Path=/{secure}"),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            cookies.append(header::SET_COOKIE, value);
        }
    }
    cookies.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /online`: the users present in the room (from the gateway's `Presence`; empty when the
/// gateway keeps no presence for `chat:`).
async fn online(State(chat): State<Arc<Chat>>) -> Json<Vec<String>> {
    let members = chat.control.presence(ROOM).await.unwrap_or_default();
    let mut names: Vec<String> = members
        .into_iter()
        .map(|m| m.user)
        .filter(|u| !u.is_empty())
        .collect();
    names.sort();
    names.dedup();
    Json(names)
}

/// `GET /messages`: the recent messages, oldest first.
async fn list(State(chat): State<Arc<Chat>>) -> Json<Vec<Value>> {
    Json(chat.state.lock().history.iter().cloned().collect())
}

#[derive(Debug, serde::Deserialize)]
struct NewMessage {
    text: String,
}

/// `POST /messages`: stores the message and pushes it to the room.
async fn post(
    State(chat): State<Arc<Chat>>,
    headers: HeaderMap,
    body: Result<Json<NewMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(name) = cookie(&headers, SESSION_COOKIE)
        .and_then(|session| chat.state.lock().sessions.get(&session).cloned())
    else {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "no session: load the page first"})),
        )
            .into_response();
    };
    let text = match body {
        Ok(Json(message)) => message.text.trim().to_owned(),
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": rejection.body_text()})),
            )
                .into_response()
        }
    };
    if text.is_empty() || text.chars().count() > MAX_TEXT {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": format!("text must be 1 to {MAX_TEXT} characters")})),
        )
            .into_response();
    }
    let message = {
        let mut records = chat.state.lock();
        records.next_id += 1;
        let message = json!({
            "type": "message",
            "id": records.next_id,
            "name": name,
            "text": text,
            "at": now_ms(),
        });
        records.history.push_back(message.clone());
        if records.history.len() > HISTORY {
            records.history.pop_front();
        }
        message
    };
    if let Err(status) = push(&chat, &message).await {
        tracing::warn!(%status, "Push failed");
        return (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": status.message()})),
        )
            .into_response();
    }
    (StatusCode::CREATED, Json(message)).into_response()
}

async fn push(chat: &Chat, payload: &Value) -> Result<(), tonic::Status> {
    chat.control
        .push(&[ROOM], &payload.to_string())
        .await
        .map(drop)
}

/// Serves the `typing` action over a `Handle` stream, reconnecting while the app runs.
async fn handle_typing(chat: Arc<Chat>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let result = tokio::select! {
            result = typing_stream(&chat) => result,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(err) => tracing::info!(%err, "Handle stream ended; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn typing_stream(chat: &Chat) -> anyhow::Result<()> {
    let mut handler = chat.control.handle("chat", &["typing"], false).await?;
    tracing::info!("serving the `typing` action");
    while let Some(message) = handler.next().await? {
        let name = chat.state.lock().sockets.get(&message.digest).cloned();
        let (status, body) = match name {
            Some(name) => match push(chat, &json!({"type": "typing", "name": name})).await {
                Ok(()) => (200, json!({"ok": true})),
                Err(status) => (502, json!({"error": status.message()})),
            },
            None => (403, json!({"error": "unknown socket"})),
        };
        handler
            .reply(message.delivery_id, status, &body.to_string())
            .await?;
    }
    Ok(())
}

/// A display name: the query's, trimmed to 24 printable characters, or `guest-NNNN`.
fn clean_name(name: Option<&str>) -> String {
    let name: String = name
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(24)
        .collect::<String>()
        .trim()
        .to_owned();
    if name.is_empty() {
        format!("guest-{:04}", rand::random::<u16>() % 10_000)
    } else {
        name
    }
}

/// `host:port` or `[v6]:port` -> the host name alone.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 2]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The gateway's `/channelgate.js`, from its WebSocket URL.
fn script_url(ws_url: &str) -> String {
    let http = if let Some(rest) = ws_url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else if let Some(rest) = ws_url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else {
        ws_url.to_owned()
    };
    match http.find("://").map(|i| i + 3) {
        Some(start) => {
            let end = http[start..].find('/').map_or(http.len(), |i| start + i);
            format!("{}/channelgate.js", &http[..end])
        }
        None => "/channelgate.js".into(),
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
