//! Command-line surface: parse arguments, set up logging, call [`crate::app`] (or
//! [`crate::audit_query`], [`crate::tokens_query`], [`crate::import`], [`crate::pinning`]) with plain values. Nothing imports this module back: `app` owns the run.

use std::path::PathBuf;
use std::process::ExitCode;

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
        /// Also connect to the upstreams and list the tools whose definitions differ from
        /// `servers.lock` (changed, new, removed); exit 1 when any does.
        #[arg(long)]
        pins: bool,
    },
    /// Connect to the upstreams and pin their tool definitions in `servers.lock` (SHA-256 of each
    /// definition in RFC 8785 canonical JSON), for `[guard] pins`.
    Pin {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
        /// Only this server (repeatable; default: every server).
        #[arg(long = "server", value_name = "NAME")]
        servers: Vec<String>,
        /// Re-pin only this tool to its current definition (repeatable).
        #[arg(long, value_name = "SERVER/TOOL")]
        accept: Vec<String>,
        /// Who pins, recorded in the lock (default: $USER).
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
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
    /// Convert a client's MCP config (Claude Desktop, Claude Code, Cursor, VS Code) into a servers.toml.
    Import {
        /// `claude_desktop_config.json`, `.mcp.json`, `.cursor/mcp.json` or `.vscode/mcp.json`.
        file: PathBuf,
        /// Write here instead of stdout (never over an existing file without --force).
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[arg(long)]
        force: bool,
        /// The broker's listen address written into [broker].
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Write a commented starter servers.toml.
    Init {
        #[arg(long, short, default_value = "servers.toml")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Read the audit trail: a table of records, filtered (or the raw JSON lines with --json).
    Audit(AuditArgs),
    /// Ask a running broker what every server is doing (GET /status): state, last error, restarts,
    /// next retry, counts, connections, calls in flight; sessions by protocol version.
    Status {
        #[arg(long, short, default_value = "servers.toml")]
        config: PathBuf,
        /// The broker's /status URL (default: from the config, metrics_listen if set, else listen).
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON the broker answered.
        #[arg(long)]
        json: bool,
        /// A bearer token holding one of [auth] admin_scopes (or env MCP_BROKER_TOKEN).
        #[arg(long)]
        token: Option<String>,
    },
    /// The upstream OAuth tokens a running broker keeps per caller: list or revoke them
    /// (GET/DELETE /admin/tokens, with a token holding one of [auth] admin_scopes).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Calls waiting for an approver (`effect = "approve"` rules): list, approve or deny them with
    /// your own token (GET/POST /admin/approvals).
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
}

/// Where a running broker is, and the approver's own token.
#[derive(clap::Args, Debug)]
pub struct ApproverTarget {
    #[arg(long, short, default_value = "servers.toml")]
    pub config: PathBuf,
    /// The broker's /admin/approvals URL (default: from the config's [broker] listen).
    #[arg(long)]
    pub url: Option<String>,
    /// Your own bearer token (or env MCP_BROKER_TOKEN); you must be one of the rule's approvers.
    #[arg(long)]
    pub token: Option<String>,
    /// Print the JSON the broker answered.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// The calls waiting for you to decide (id, caller, tool, arguments, expiry).
    List {
        #[command(flatten)]
        target: ApproverTarget,
    },
    /// Let a waiting call go on, and grant the same calls for --duration (one the rule offers;
    /// default its first).
    Approve {
        id: String,
        #[arg(long)]
        duration: Option<String>,
        #[command(flatten)]
        target: ApproverTarget,
    },
    /// Refuse a waiting call.
    Deny {
        id: String,
        #[command(flatten)]
        target: ApproverTarget,
    },
}

/// Where a running broker is, and the admin token to ask it with.
#[derive(clap::Args, Debug)]
pub struct AdminTarget {
    #[arg(long, short, default_value = "servers.toml")]
    pub config: PathBuf,
    /// The broker's /admin/tokens URL (default: from the config's [broker] listen).
    #[arg(long)]
    pub url: Option<String>,
    /// A bearer token holding one of [auth] admin_scopes (or env MCP_BROKER_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// Print the JSON the broker answered.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// List the upstream tokens the broker keeps (who, which server, kind, issuer, expiry); never
    /// a secret.
    List {
        #[command(flatten)]
        target: AdminTarget,
        /// Only this caller's tokens.
        #[arg(long)]
        sub: Option<String>,
    },
    /// Remove upstream tokens: a caller's (--sub), a server's (--server), or one (both).
    #[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["sub", "server"])))]
    Revoke {
        #[command(flatten)]
        target: AdminTarget,
        /// Every token of this caller (with --server: only that server's).
        #[arg(long)]
        sub: Option<String>,
        /// Every caller's token for this server (`@sign-in`: the enterprise sign-in's).
        #[arg(long)]
        server: Option<String>,
    },
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
            Command::Check {
                config,
                stdio,
                pins,
            } => match app::check(&config, stdio) {
                Ok(code) if pins && code == ExitCode::SUCCESS => {
                    crate::pinning::check(&config).await
                }
                other => other,
            },
            Command::Pin {
                config,
                servers,
                accept,
                by,
            } => {
                let args = crate::pinning::PinArgs {
                    servers,
                    accept,
                    by,
                };
                crate::pinning::pin(&config, &args).await
            }
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
            Command::Status {
                config,
                url,
                json,
                token,
            } => {
                let token = token.or_else(|| std::env::var("MCP_BROKER_TOKEN").ok());
                crate::status_query::run(&config, url.as_deref(), json, token.as_deref()).await
            }
            Command::Tokens(cmd) => tokens(cmd).await,
            Command::Approvals(cmd) => crate::approvals_query::run(cmd).await,
            Command::Import {
                file,
                out,
                force,
                listen,
            } => Ok(crate::import::run_import(
                &file,
                out.as_deref(),
                force,
                &listen,
            )?),
            Command::Init { out, force } => Ok(crate::import::run_init(&out, force)?),
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

async fn tokens(cmd: TokensCommand) -> anyhow::Result<std::process::ExitCode> {
    use crate::tokens_query::{Target, list, revoke};
    let (target, sub, server) = match &cmd {
        TokensCommand::List { target, sub } => (target, sub, &None),
        TokensCommand::Revoke {
            target,
            sub,
            server,
        } => (target, sub, server),
    };
    let token = target
        .token
        .clone()
        .or_else(|| std::env::var("MCP_BROKER_TOKEN").ok());
    let t = Target {
        config: &target.config,
        url: target.url.as_deref(),
        token: token.as_deref(),
    };
    match cmd {
        TokensCommand::List { .. } => list(&t, sub.as_deref(), target.json).await,
        TokensCommand::Revoke { .. } => {
            revoke(&t, sub.as_deref(), server.as_deref(), target.json).await
        }
    }
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
