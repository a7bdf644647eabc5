//! Command-line surface: parse arguments, set up logging, hand over to [`crate::app`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// The audit file; defaults to `[audit] file` of the configuration.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    #[arg(long, short, default_value = "servers.toml")]
    pub config: PathBuf,
    /// Only this subject.
    #[arg(long)]
    pub sub: Option<String>,
    /// Only this tool (or prompt/resource) name, exposed or upstream; `*` globs allowed.
    #[arg(long)]
    pub tool: Option<String>,
    /// Only this server.
    #[arg(long)]
    pub server: Option<String>,
    /// Only records newer than this (`90s`, `15m`, `1h`, `2d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only denied or rate-limited requests.
    #[arg(long)]
    pub denied: bool,
    /// Only this outcome (ok, tool_error, error, timeout, cancelled, denied, rate_limited).
    #[arg(long)]
    pub outcome: Option<String>,
    /// Print the matching records as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show at most the last N matching records.
    #[arg(long)]
    pub last: Option<usize>,
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
    let code = rt.block_on(crate::app::run(cli.command));
    // Do not wait for blocking tasks: under `stdio`, one is parked in a read of stdin that cannot
    // be cancelled, and would keep the process alive after a SIGTERM until the client closes stdin.
    // Everything that matters (the audit trail) is flushed before `run` returns.
    rt.shutdown_background();
    code
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // rmcp logs every notification at INFO and every handler error at WARN: keep it quieter.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
