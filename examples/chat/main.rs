//! The chat example: an application service next to a channelgate node. See `README.md` here.
//!
//! ```sh
//! cargo run -- serve --upstream http://127.0.0.1:3000 --allowed-origins http://127.0.0.1:3000
//! cargo run --example chat
//! ```
//! Then open <http://127.0.0.1:3000/?name=ann> and <http://127.0.0.1:3000/?name=bob>.

mod app;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs the chat application service.
#[derive(Debug, Parser)]
struct Args {
    /// Address the app listens on.
    #[arg(long, default_value = "127.0.0.1:3000", env = "CHAT_LISTEN")]
    listen: std::net::SocketAddr,
    /// The gateway's control plane.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "CHANNELGATE_SERVER"
    )]
    control: String,
    /// Bearer token for the control plane, when the node has `--control-token`.
    #[arg(long, env = "CHANNELGATE_TOKEN")]
    token: Option<String>,
    /// WebSocket URL browsers connect to (e.g. wss://rt.example.com/ws). Default: the page's
    /// host name on --gateway-port.
    #[arg(long, env = "CHAT_GATEWAY_URL")]
    gateway_url: Option<String>,
    /// The gateway's client-plane port, when --gateway-url is not given.
    #[arg(long, default_value_t = 8080, env = "CHAT_GATEWAY_PORT")]
    gateway_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHAT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = app::ChatConfig {
        control: args.control,
        token: args.token,
        gateway_url: args.gateway_url,
        gateway_port: args.gateway_port,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(
        "chat app on http://{}/ (control plane {}, gateway {})",
        listener.local_addr()?,
        config.control,
        config
            .gateway_url
            .clone()
            .unwrap_or_else(|| format!("ws://<page host>:{}/ws", config.gateway_port))
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    app::serve(listener, config, shutdown).await
}
