//! The `channelgate` binary: `serve` runs an edge node; the other subcommands are clients of
//! a node's control plane, for operators and scripts.
//!
//! This file declares no modules: it uses the library (`channelgate::…`), so nothing is
//! compiled twice.

use std::{io::Read as _, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tonic::{metadata::MetadataValue, transport::Channel, Request};

use channelgate::{config::Settings, pb, pb::control_client::ControlClient, Listeners};

/// Realtime edge gateway: digest-checked WebSockets, channels, and a gRPC control plane.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the `serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run an edge node (client plane and control plane).
    Serve {
        #[command(flatten)]
        settings: Settings,
        /// Log format: `text` or `json`.
        #[arg(long, env = "CHANNELGATE_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Mint connection credentials; prints them as JSON (or shell variables with --env).
    Issue {
        #[command(flatten)]
        client: ClientArgs,
        /// Time to live of the credentials (e.g. 5m); the node's default when absent.
        #[arg(long)]
        ttl: Option<channelgate::config::HumanDuration>,
        /// Print `export CONNECTION_ID=..` (and SOCKET_KEY, DIGEST) lines for `eval` in a shell.
        #[arg(long)]
        env: bool,
        /// Subscribe the new credentials to this channel in the same call (repeatable).
        #[arg(long = "channel", value_name = "CHANNEL")]
        channels: Vec<String>,
    },
    /// Open a WebSocket as a client would: prints every frame it receives as a line, and sends
    /// each line of standard input as a text frame.
    Connect {
        /// WebSocket endpoint of the node.
        #[arg(
            long,
            env = "CHANNELGATE_WS_URL",
            default_value = "ws://127.0.0.1:8080/ws"
        )]
        url: String,
        /// The connection id.
        #[arg(long, env = "CONNECTION_ID")]
        id: String,
        /// The socket key (sent in the `socket_key` cookie).
        #[arg(long, env = "SOCKET_KEY", hide_env_values = true)]
        key: String,
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
    /// Push JSON to a channel (from the argument, or standard input when absent or `-`).
    Push {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel name.
        channel: String,
        /// JSON text.
        json: Option<String>,
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
    /// Close a connection and end its credentials.
    Disconnect {
        #[command(flatten)]
        client: ClientArgs,
        /// The connection's digest.
        digest: String,
        /// Close code, 4000-4999.
        #[arg(long, default_value_t = 4000)]
        code: u32,
        /// Close reason.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print every push to the channels as a JSON line `{"channel":..,"json":..}` until
    /// interrupted.
    Listen {
        #[command(flatten)]
        client: ClientArgs,
        /// Channel names.
        #[arg(required = true)]
        channels: Vec<String>,
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
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
    async fn connect(&self) -> anyhow::Result<Control> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.server.clone())
            .with_context(|| format!("invalid --server {}", self.server))?;
        if self.tls_ca.is_some() || self.tls_cert.is_some() {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.server))?;
        let token = self
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<_>>())
            .transpose()
            .context("invalid --token")?;
        Ok(Control {
            client: ControlClient::new(channel),
            token,
        })
    }
}

struct Control {
    client: ControlClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Control {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }
}

fn json_arg(json: Option<String>) -> anyhow::Result<String> {
    match json.as_deref() {
        Some("-") | None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading JSON from standard input")?;
            Ok(text)
        }
        Some(text) => Ok(text.to_owned()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            if let Some(status) = err.downcast_ref::<tonic::Status>() {
                eprintln!("error: {}: {}", status.code(), status.message());
                // Distinct exit codes for scripts: 2 for a refused request, 1 otherwise.
                return ExitCode::from(2);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let print = |value: serde_json::Value| println!("{value}");
    match command {
        Command::Serve {
            settings,
            log_format,
        } => return serve(settings, log_format).await,
        Command::Connect { url, id, key } => return connect(&url, &id, &key).await,
        Command::Issue {
            client,
            ttl,
            env,
            channels,
        } => {
            let mut c = client.connect().await?;
            let ttl_ms = ttl.map_or(0, |t| t.0.as_millis() as u64);
            let r = c
                .client
                .issue_connection(c.request(pb::IssueConnectionRequest { ttl_ms, channels }))
                .await?
                .into_inner();
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
            let mut c = client.connect().await?;
            let r = c
                .client
                .subscribe(c.request(pb::SubscribeRequest { digest, channels }))
                .await?
                .into_inner();
            print(serde_json::json!({ "live": r.live }));
        }
        Command::Unsubscribe {
            client,
            digest,
            channels,
        } => {
            let mut c = client.connect().await?;
            let r = c
                .client
                .unsubscribe(c.request(pb::UnsubscribeRequest { digest, channels }))
                .await?
                .into_inner();
            print(serde_json::json!({ "live": r.live }));
        }
        Command::Push {
            client,
            channel,
            json,
        } => {
            let json = json_arg(json)?;
            let mut c = client.connect().await?;
            let r = c
                .client
                .push(c.request(pb::PushRequest {
                    channels: vec![channel],
                    json,
                }))
                .await?
                .into_inner();
            print(serde_json::json!({ "queued": r.queued }));
        }
        Command::Send {
            client,
            digest,
            channel,
            json,
        } => {
            let json = json_arg(json)?;
            let mut c = client.connect().await?;
            let r = c
                .client
                .send(c.request(pb::SendRequest {
                    digest,
                    channel,
                    json,
                }))
                .await?
                .into_inner();
            print(serde_json::json!({ "queued": r.queued }));
        }
        Command::Disconnect {
            client,
            digest,
            code,
            reason,
        } => {
            let mut c = client.connect().await?;
            let r = c
                .client
                .disconnect(c.request(pb::DisconnectRequest {
                    digest,
                    code,
                    reason,
                }))
                .await?
                .into_inner();
            print(serde_json::json!({ "closed": r.closed }));
        }
        Command::Listen { client, channels } => {
            let mut c = client.connect().await?;
            let mut events = c
                .client
                .listen(c.request(pb::ListenRequest { channels }))
                .await?
                .into_inner();
            while let Some(event) = events.message().await? {
                print(serde_json::json!({ "channel": event.channel, "json": event.json }));
            }
        }
        Command::Stats {
            client,
            per_channel,
            channels,
        } => {
            let mut c = client.connect().await?;
            let r = c
                .client
                .stats(c.request(pb::StatsRequest {
                    per_channel,
                    channels,
                }))
                .await?
                .into_inner();
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

async fn connect(url: &str, id: &str, key: &str) -> anyhow::Result<ExitCode> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncBufReadExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let mut request = format!("{url}?socket_connection_id={id}")
        .into_client_request()
        .context("invalid --url")?;
    request.headers_mut().insert(
        "cookie",
        format!("socket_key={key}")
            .parse()
            .context("invalid --key")?,
    );
    let (ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow::bail!("handshake refused: {} {}", response.status(), body.trim());
        }
        Err(err) => return Err(err).context("connecting"),
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
                Some(Err(err)) => return Err(err).context("reading"),
                None => return Ok(ExitCode::SUCCESS),
            },
            line = lines.next_line(), if stdin_open => match line.context("reading standard input")? {
                Some(line) if !line.trim().is_empty() => sink.send(Message::text(line)).await.context("sending")?,
                Some(_) => {}
                None => stdin_open = false,
            },
        }
    }
}

async fn serve(settings: Settings, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHANNELGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A failed log write is reported with eprintln!, which panics when standard error is a
        // closed pipe (a log collector that went away): the gateway must not die of that.
        .log_internal_errors(false);
    match log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    // Before anything else: a SIGTERM during start-up must drain, not kill.
    let mut signals =
        channelgate::shutdown::Signals::new().context("installing signal handlers")?;
    let file = settings.load_file()?;
    let config = settings.merge(file).into_config()?;
    let listeners = Listeners::bind(&config).await?;

    let token = tokio_util::sync::CancellationToken::new();
    let run = channelgate::run(listeners, config, token.clone().cancelled_owned());
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => { result?; return Ok(ExitCode::SUCCESS) }
        signal = signals.recv() => tracing::info!(signal, "shutting down; a second signal exits at once"),
    }
    token.cancel();
    tokio::select! {
        result = &mut run => result?,
        signal = signals.recv() => {
            tracing::warn!(signal, "second signal: exiting now");
            return Ok(ExitCode::from(130));
        }
    }
    Ok(ExitCode::SUCCESS)
}
