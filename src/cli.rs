//! Command-line surface: parse arguments, set up logging, call [`crate::app`] (or
//! [`crate::audit_query`]) with plain values. Nothing imports this module back: `app` owns the run.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app;
use crate::audit_query::AuditArgs;

#[derive(Parser, Debug)]
#[command(
    name = "mcp-broker",
    version,
    about = "One MCP endpoint in front of many MCP servers"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the Streamable HTTP MCP endpoint at /mcp on [broker].listen.
    Serve {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
        /// Allow listening on a non-loopback address without inbound authentication.
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// Serve MCP over stdin/stdout, for clients that launch a command (Claude Desktop).
    Stdio {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
    },
    /// Validate the configuration and exit (0 = valid).
    Check {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
        /// Validate for `mcp-broker stdio` (where stdout is the MCP channel).
        #[arg(long)]
        stdio: bool,
    },
    /// Connect to every upstream and print the namespaced catalog.
    Tools {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show the catalog as the caller behind this bearer token sees it (needs [auth]).
        #[arg(long)]
        token: Option<String>,
    },
    /// Read the audit trail: a table of records, filtered (or the raw JSON lines with --json).
    Audit(AuditArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parse arguments and run; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-broker: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Check { config, stdio } => app::check(&config, stdio),
            Command::Serve {
                config,
                insecure_no_auth,
            } => app::serve(&config, insecure_no_auth).await,
            Command::Stdio { config } => app::stdio(&config).await,
            Command::Tools {
                config,
                json,
                token,
            } => app::tools(&config, json, token.as_deref()).await,
            Command::Audit(args) => crate::audit_query::run(&args),
        }
    });
    let code = result.unwrap_or_else(|e| {
        eprintln!("mcp-broker: {e:#}");
        std::process::ExitCode::FAILURE
    });
    // Do not wait for blocking tasks: under `stdio`, one is parked in a read of stdin that cannot
    // be cancelled, and would keep the process alive after a SIGTERM until the client closes stdin.
    // Everything that matters (the audit trail) is flushed before `run` returns.
    rt.shutdown_background();
    code
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // rmcp logs every notification at INFO and every handler error at WARN: keep it quieter.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn,rmcp::service=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
