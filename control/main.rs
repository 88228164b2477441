//! The `channelgate` binary: `serve` runs a node (both planes, through [`channelgate::run`]);
//! the other subcommands are clients of a node ([`channelgate::cli`]).
//!
//! This file declares no modules: it uses the library (`channelgate::…`), so nothing is
//! compiled twice.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use channelgate::{cli, config::Settings, Listeners};

/// mimalloc instead of glibc's malloc: a node allocates and frees small blocks on every call,
/// push and frame (futures, headers, frames), where glibc spent a tenth of the node's CPU
/// (coalescing and unlinking free chunks), and idle sockets' blocks pack tighter
/// (BENCHMARKS.md, "What each change bought").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Print the SQL that creates a PostgreSQL outbox table (with its dead-letter table and
    /// its NOTIFY trigger) for a `[[consumers]]` entry of kind `postgres`. The gateway never
    /// changes an application's database itself: run it with your migrations.
    OutboxSchema {
        /// The table (`name` or `schema.name`), as in the consumer's `table`.
        #[arg(long, default_value = "channelgate_outbox")]
        table: String,
    },
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::OutboxSchema { table } = &cli.command {
        return match channelgate::ingest::outbox_schema(table) {
            Ok(sql) => {
                print!("{sql}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: --table {err}");
                ExitCode::from(2)
            }
        };
    }
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
    match cli.command {
        Command::Serve {
            settings,
            log_format,
        } => match runtime.block_on(serve(settings, log_format)) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::OutboxSchema { .. } => ExitCode::SUCCESS,
        Command::Client(command) => match runtime.block_on(cli::run(command)) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {err}");
                err.exit_code()
            }
        },
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
    let mut signals = channelgate::edge::Signals::new().context("installing signal handlers")?;
    let file = settings.load_file()?;
    let config = settings.merge(file).into_config()?;
    channelgate::settings::check(&config)?;
    channelgate::ingest::specs(&config)?;
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
