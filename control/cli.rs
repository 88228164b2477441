//! The binary's client subcommands (`issue`, `subscribe`, `push`, `listen`, `connect`, ...):
//! clients of a node's control plane (through [`Client`]) and of its client plane, for
//! operators and scripts. Results are JSON lines on standard output.

use std::{io::Read as _, process::ExitCode};

use clap::Subcommand;

use crate::client::{Client, ClientError};

/// Why a client subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The control plane could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The node refused the call (exit code 2).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The node refused the WebSocket handshake.
    #[error("handshake refused: {0}")]
    Refused(String),
    /// The WebSocket failed.
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The event stream or a POST failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// An argument that cannot be used.
    #[error("invalid {0}")]
    Invalid(String),
    /// Reading or writing a local stream failed.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

impl CliError {
    /// The process exit code: 2 for a call the node refused, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Status(_) | Self::Refused(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint connection credentials; prints them as JSON (or shell variables with --env).
    Issue {
        #[command(flatten)]
        client: ClientArgs,
        /// Time to live of the credentials (e.g. 5m); the node's default when absent.
        #[arg(long)]
        ttl: Option<crate::config::HumanDuration>,
        /// Print `export CONNECTION_ID=..` (and SOCKET_KEY, DIGEST) lines for `eval` in a shell.
        #[arg(long)]
        env: bool,
        /// Subscribe the new credentials to this channel in the same call (repeatable).
        #[arg(long = "channel", value_name = "CHANNEL")]
        channels: Vec<String>,
        /// The user the credentials belong to (send and disconnect can then take --user).
        #[arg(long)]
        user: Option<String>,
        /// JSON bound to the credentials with --user (shown in presence).
        #[arg(long, requires = "user")]
        info: Option<String>,
    },
    /// Connect as a client would: prints every frame it receives as a line, and sends each line
    /// of standard input as a client message (a text frame; with `--transport sse`, a POST
    /// whose reply is printed too).
    Connect {
        /// WebSocket endpoint of the node.
        #[arg(
            long,
            env = "CHANNELGATE_WS_URL",
            default_value = "ws://127.0.0.1:8080/ws"
        )]
        url: String,
        /// The connection id.
        #[arg(long, env = "CONNECTION_ID", allow_hyphen_values = true)]
        id: String,
        /// The socket key (sent in the `socket_key` cookie). URL-safe base64: it may start
        /// with `-`, which is taken as the value, not as an option.
        #[arg(
            long,
            env = "SOCKET_KEY",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        key: String,
        /// `websocket`, or `sse` (Server-Sent Events and POSTs, over plain HTTP: the URL's
        /// scheme becomes http, and a `/ws` path `/sse`).
        #[arg(long, default_value = "websocket", value_parser = ["websocket", "sse"])]
        transport: String,
    },
    /// Subscribe a connection (by digest) to channels.
    Subscribe {
        #[command(flatten)]
        client: ClientArgs,
        /// The connection's digest.
        digest: String,
        /// Channel names.
        #[arg(required = true)]
        channels: Vec<String>,
    },
    /// Unsubscribe a connection (by digest) from channels.
    Unsubscribe {
        #[command(flatten)]
        client: ClientArgs,
        /// The connection's digest.
        digest: String,
        /// Channel names.
        #[arg(required = true)]
        channels: Vec<String>,
    },
    /// Push JSON to a channel (from the argument, or standard input when absent or `-`);
    /// prints the sockets it was queued to here and the channel's new position.
    Push {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel name.
        channel: String,
        /// JSON text.
        json: Option<String>,
        /// Idempotency key: a retry with the same key within the window is taken once.
        #[arg(long)]
        key: Option<String>,
    },
    /// Print a page of a channel's history as JSON: its position and the pushes.
    History {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel name.
        channel: String,
        /// Pushes after this position (before it, with --reverse): EPOCH:OFFSET, or OFFSET.
        #[arg(long)]
        since: Option<String>,
        /// Most pushes to print (at most 1000; 0: the position only).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Newest first.
        #[arg(long)]
        reverse: bool,
    },
    /// Send JSON to one connection, framed as a push on CHANNEL.
    Send {
        #[command(flatten)]
        client: ClientArgs,
        /// The connection's digest.
        digest: String,
        /// Channel name shown to the client.
        channel: String,
        /// JSON text (standard input when absent or `-`).
        json: Option<String>,
    },
    /// Send JSON to every live connection of USER, on every node, framed as a push on CHANNEL.
    SendUser {
        #[command(flatten)]
        client: ClientArgs,
        /// The user.
        user: String,
        /// Channel name shown to the client.
        channel: String,
        /// JSON text (standard input when absent or `-`).
        json: Option<String>,
    },
    /// Close a connection and end its credentials (or all of --user's).
    Disconnect {
        #[command(flatten)]
        client: ClientArgs,
        /// Every set of this user's credentials, on every node, instead of one digest.
        #[arg(long, conflicts_with = "digest")]
        user: Option<String>,
        /// The connection's digest.
        #[arg(required_unless_present = "user")]
        digest: Option<String>,
        /// Close code, 4000-4099 (the client does not reconnect: the credentials are dead).
        #[arg(long, default_value_t = 4000)]
        code: u32,
        /// Close reason.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print every push to the channels as a JSON line
    /// `{"channel":..,"json":..,"epoch":..,"offset":..}` until interrupted (a line with
    /// `"gap":true` when pushes before its position cannot be replayed).
    Listen {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel names.
        #[arg(required = true)]
        channels: Vec<String>,
        /// Replay a channel from a position first: CHANNEL=EPOCH:OFFSET (repeatable).
        #[arg(long = "since", value_name = "CHANNEL=EPOCH:OFFSET")]
        since: Vec<String>,
    },
    /// Print who is in a channel (its namespace must keep presence) as JSON; with --stats,
    /// only the counts.
    Presence {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel name.
        channel: String,
        /// Only `{connections, users}`.
        #[arg(long)]
        stats: bool,
    },
    /// Print the node's counts as JSON.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
        /// Include per-channel subscriber counts (all channels, or only those named).
        #[arg(long)]
        per_channel: bool,
        /// Only these channels.
        channels: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Control plane URL of the node.
    #[arg(
        long,
        env = "CHANNELGATE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Bearer token for the control plane.
    #[arg(long, env = "CHANNELGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA (PEM) to verify a TLS control plane with (use an https:// --server). The
    /// environment names differ from `serve`'s CHANNELGATE_TLS_*, which are the node's own
    /// certificate.
    #[arg(long, env = "CHANNELGATE_CLIENT_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS; with --tls-key.
    #[arg(
        long,
        env = "CHANNELGATE_CLIENT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) for mutual TLS; with --tls-cert.
    #[arg(
        long,
        env = "CHANNELGATE_CLIENT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
}

impl ClientArgs {
    async fn connect(&self) -> Result<Client, CliError> {
        let mut builder = Client::builder(self.server.clone()).token_opt(self.token.clone());
        if let Some(ca) = &self.tls_ca {
            builder = builder.tls_ca(ca);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            builder = builder.identity(cert, key);
        }
        Ok(builder.connect().await?)
    }
}

fn json_arg(json: Option<String>) -> Result<String, CliError> {
    match json.as_deref() {
        Some("-") | None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Io("reading JSON from standard input", e))?;
            Ok(text)
        }
        Some(text) => Ok(text.to_owned()),
    }
}

/// A position argument: `EPOCH:OFFSET`, or `OFFSET` (no epoch check).
fn position_arg(text: &str) -> Result<(String, u64), CliError> {
    let (epoch, offset) = text.rsplit_once(':').unwrap_or(("", text));
    let offset = offset
        .parse()
        .map_err(|_| CliError::Invalid(format!("position {text:?}: EPOCH:OFFSET or OFFSET")))?;
    Ok((epoch.to_owned(), offset))
}

/// Runs one client subcommand; prints its result as JSON on standard output.
pub async fn run(command: Command) -> Result<ExitCode, CliError> {
    let print = |value: serde_json::Value| println!("{value}");
    match command {
        Command::Connect {
            url,
            id,
            key,
            transport,
        } => {
            return match transport.as_str() {
                "sse" => event_stream(&url, &id, &key).await,
                _ => websocket(&url, &id, &key).await,
            }
        }
        Command::Issue {
            client,
            ttl,
            env,
            channels,
            user,
            info,
        } => {
            let r = client
                .connect()
                .await?
                .issue_for(
                    ttl.map(|t| t.0),
                    &channels,
                    user.as_deref().unwrap_or(""),
                    info.as_deref().unwrap_or(""),
                )
                .await?;
            if env {
                println!(
                    "export CONNECTION_ID={}\nexport SOCKET_KEY={}\nexport DIGEST={}",
                    r.connection_id, r.socket_key, r.digest
                );
                return Ok(ExitCode::SUCCESS);
            }
            print(serde_json::json!({
                "connection_id": r.connection_id,
                "socket_key": r.socket_key,
                "digest": r.digest,
                "expires_at_unix_ms": r.expires_at_unix_ms,
            }));
        }
        Command::Subscribe {
            client,
            digest,
            channels,
        } => {
            let live = client
                .connect()
                .await?
                .subscribe(&digest, &channels)
                .await?;
            print(serde_json::json!({ "live": live }));
        }
        Command::Unsubscribe {
            client,
            digest,
            channels,
        } => {
            let live = client
                .connect()
                .await?
                .unsubscribe(&digest, &channels)
                .await?;
            print(serde_json::json!({ "live": live }));
        }
        Command::Push {
            client,
            channel,
            json,
            key,
        } => {
            let json = json_arg(json)?;
            let r = client
                .connect()
                .await?
                .push_keyed(&[channel], &json, key.as_deref())
                .await?;
            let positions: serde_json::Map<String, serde_json::Value> = r
                .positions
                .iter()
                .map(|p| {
                    let at = serde_json::json!({ "epoch": p.epoch, "offset": p.offset });
                    (p.channel.clone(), at)
                })
                .collect();
            print(serde_json::json!({ "queued": r.queued, "positions": positions }));
        }
        Command::History {
            client,
            channel,
            since,
            limit,
            reverse,
        } => {
            let since = since.as_deref().map(position_arg).transpose()?;
            let r = client
                .connect()
                .await?
                .history(
                    &channel,
                    since.as_ref().map(|(e, o)| (e.as_str(), *o)),
                    limit,
                    reverse,
                )
                .await?;
            let pushes: Vec<serde_json::Value> = r
                .publications
                .iter()
                .map(|p| serde_json::json!({ "offset": p.offset, "json": p.json }))
                .collect();
            print(serde_json::json!({ "epoch": r.epoch, "offset": r.offset, "pushes": pushes }));
        }
        Command::Send {
            client,
            digest,
            channel,
            json,
        } => {
            let json = json_arg(json)?;
            let queued = client
                .connect()
                .await?
                .send(&digest, &channel, &json)
                .await?;
            print(serde_json::json!({ "queued": queued }));
        }
        Command::SendUser {
            client,
            user,
            channel,
            json,
        } => {
            let json = json_arg(json)?;
            let n = client
                .connect()
                .await?
                .send_user(&user, &channel, &json)
                .await?;
            print(serde_json::json!({ "queued": n > 0, "connections": n }));
        }
        Command::Disconnect {
            client,
            user,
            digest,
            code,
            reason,
        } => {
            let client = client.connect().await?;
            match (user, digest) {
                (Some(user), _) => {
                    let n = client.disconnect_user(&user, code, &reason).await?;
                    print(serde_json::json!({ "closed": n > 0, "connections": n }));
                }
                (None, digest) => {
                    let closed = client
                        .disconnect(&digest.unwrap_or_default(), code, &reason)
                        .await?;
                    print(serde_json::json!({ "closed": closed }));
                }
            }
        }
        Command::Presence {
            client,
            channel,
            stats,
        } => {
            let client = client.connect().await?;
            if stats {
                let (connections, users) = client.presence_stats(&channel).await?;
                print(serde_json::json!({ "connections": connections, "users": users }));
            } else {
                let members: Vec<_> = client
                    .presence(&channel)
                    .await?
                    .into_iter()
                    .map(|m| {
                        serde_json::json!({
                            "digest": m.digest, "connection_id": m.connection_id,
                            "user": m.user, "info_json": m.info_json,
                            "since_unix_ms": m.since_unix_ms,
                        })
                    })
                    .collect();
                print(serde_json::json!({ "members": members }));
            }
        }
        Command::Listen {
            client,
            channels,
            since,
        } => {
            let since = since
                .iter()
                .map(|arg| {
                    let (channel, at) = arg.split_once('=').ok_or_else(|| {
                        CliError::Invalid(format!("--since {arg:?}: CHANNEL=EPOCH:OFFSET"))
                    })?;
                    Ok((channel.to_owned(), position_arg(at)?))
                })
                .collect::<Result<_, CliError>>()?;
            let mut events = client
                .connect()
                .await?
                .listen_from(&channels, since)
                .await?;
            while let Some(event) = events.message().await? {
                let mut line = serde_json::json!({
                    "channel": event.channel,
                    "json": event.json,
                    "epoch": event.epoch,
                    "offset": event.offset,
                });
                if event.gap {
                    line["gap"] = true.into();
                    line["json"] = serde_json::Value::Null;
                }
                print(line);
            }
        }
        Command::Stats {
            client,
            per_channel,
            channels,
        } => {
            let r = client
                .connect()
                .await?
                .stats(per_channel, &channels)
                .await?;
            print(serde_json::json!({
                "connections": r.connections,
                "channels": r.channels,
                "subscriptions": r.subscriptions,
                "sessions": r.sessions,
                "channel_subscribers": r.channel_subscribers,
            }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn websocket(url: &str, id: &str, key: &str) -> Result<ExitCode, CliError> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncBufReadExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let mut request = format!("{url}?socket_connection_id={id}")
        .into_client_request()
        .map_err(|e| CliError::Invalid(format!("--url: {e}")))?;
    request.headers_mut().insert(
        "cookie",
        format!("socket_key={key}")
            .parse()
            .map_err(|_| CliError::Invalid("--key is not a valid cookie value".into()))?,
    );
    let (ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            return Err(CliError::Refused(format!(
                "{} {}",
                response.status(),
                body.trim()
            )));
        }
        Err(err) => return Err(CliError::WebSocket(err)),
    };
    eprintln!("connected; type JSON messages, one per line");
    let (mut sink, mut stream) = ws.split();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    eprintln!("closed by the server: {code} {reason}");
                    return Ok(ExitCode::SUCCESS);
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(CliError::WebSocket(err)),
                None => return Ok(ExitCode::SUCCESS),
            },
            line = lines.next_line(), if stdin_open => match line.map_err(|e| CliError::Io("reading standard input", e))? {
                Some(line) if !line.trim().is_empty() => sink.send(Message::text(line)).await.map_err(CliError::WebSocket)?,
                Some(_) => {}
                None => stdin_open = false,
            },
        }
    }
}

/// The event-stream URL for `url`: http(s) for ws(s), `/sse` for a `/ws` path.
fn sse_url(url: &str) -> Result<String, CliError> {
    let url = if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if url.starts_with("wss://") || url.starts_with("https://") {
        return Err(CliError::Invalid(
            "--url: --transport sse speaks plain http:// (use the WebSocket over TLS)".into(),
        ));
    } else {
        url.to_owned()
    };
    Ok(match url.strip_suffix("/ws") {
        Some(base) => format!("{base}/sse"),
        None => url,
    })
}

/// `connect --transport sse`: prints each event's data as a line; each line of standard input
/// is POSTed, and its reply printed.
async fn event_stream(url: &str, id: &str, key: &str) -> Result<ExitCode, CliError> {
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncBufReadExt;

    let url = format!("{}?socket_connection_id={id}", sse_url(url)?);
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = |method: &str, body: String, json: bool| {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("cookie", format!("socket_key={key}"));
        if json {
            builder = builder.header("content-type", "application/json");
        }
        builder
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| CliError::Invalid(format!("--url: {e}")))
    };
    let response = client
        .request(request("GET", String::new(), false)?)
        .await
        .map_err(|e| CliError::Http(e.to_string()))?;
    if response.status() != hyper::StatusCode::OK {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        let body = body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        return Err(CliError::Refused(format!("{status} {}", body.trim())));
    }
    eprintln!("connected (event stream); type JSON messages, one per line");
    let mut body = response.into_body();
    let (mut text, mut data) = (String::new(), Vec::<String>::new());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(chunk) = frame.into_data() {
                        text.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = text.find('\n') {
                            let line: String = text.drain(..=end).collect();
                            let line = line.trim_end_matches(['\r', '\n']);
                            if line.is_empty() && !data.is_empty() {
                                println!("{}", data.join("\n"));
                                data.clear();
                            } else if let Some(value) = line.strip_prefix("data: ") {
                                data.push(value.to_owned());
                            } else if let Some(why) = line.strip_prefix(": not now: ") {
                                eprintln!("not now ({why}); try again in a second");
                            }
                        }
                    }
                }
                Some(Err(err)) => return Err(CliError::Http(err.to_string())),
                None => {
                    eprintln!("the stream ended");
                    return Ok(ExitCode::SUCCESS);
                }
            },
            line = lines.next_line(), if stdin_open => match line.map_err(|e| CliError::Io("reading standard input", e))? {
                Some(line) if !line.trim().is_empty() => {
                    let response = client
                        .request(request("POST", line, true)?)
                        .await
                        .map_err(|e| CliError::Http(e.to_string()))?;
                    let status = response.status();
                    let reply = response.into_body().collect().await.map_err(|e| CliError::Http(e.to_string()))?.to_bytes();
                    match status {
                        hyper::StatusCode::OK => println!("{}", String::from_utf8_lossy(&reply)),
                        hyper::StatusCode::NO_CONTENT => {}
                        _ => eprintln!("message refused: {status} {}", String::from_utf8_lossy(&reply).trim()),
                    }
                }
                Some(_) => {}
                None => stdin_open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: super::Command,
    }

    /// A socket key is URL-safe base64, so one in 64 starts with `-`: it must still be the
    /// value of `--key` (the `connect` test failed now and then on exactly that).
    #[test]
    fn connect_takes_ids_and_keys_that_start_with_a_hyphen() {
        let cli = Cli::try_parse_from(["cg", "connect", "--id", "-id", "--key", "-G9xk"])
            .expect("parses");
        match cli.command {
            super::Command::Connect { id, key, .. } => {
                assert_eq!((id.as_str(), key.as_str()), ("-id", "-G9xk"));
            }
            other => panic!("{other:?}"),
        }
    }
}
