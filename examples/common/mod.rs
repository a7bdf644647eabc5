//! What both example servers share: the command line (`stdio` | `http [ADDR]`), serving over stdio
//! or Streamable HTTP with graceful shutdown, and a small RFC 3339 clock. Included by each example
//! with `mod common;` (cargo does not build a folder without `main.rs` as an example of its own).

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::serve::ListenerExt;
use rmcp::{
    ServerHandler, ServiceExt,
    service::ServerInitializeError,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use tokio_util::sync::CancellationToken;

enum Mode {
    Stdio,
    Http(String),
}

fn parse_args() -> Result<Option<Mode>, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] | ["stdio"] => Ok(Some(Mode::Stdio)),
        ["http"] => Ok(Some(Mode::Http("127.0.0.1:0".to_owned()))),
        ["http", addr] => Ok(Some(Mode::Http((*addr).to_owned()))),
        ["-h" | "--help" | "help"] => Ok(None),
        _ => Err(format!("unrecognised arguments: {}", args.join(" "))),
    }
}

/// Parse the command line and serve `make()` over stdio or Streamable HTTP until ctrl-c/SIGTERM
/// (or stdin EOF in stdio mode).
pub fn main<S>(name: &'static str, usage: &str, make: impl FnOnce() -> S) -> ExitCode
where
    S: ServerHandler + Clone + Send + Sync + 'static,
{
    init_tracing();
    let mode = match parse_args() {
        Ok(Some(mode)) => mode,
        Ok(None) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {err}\n\n{usage}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: failed to start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = make();
        match mode {
            Mode::Stdio => serve_stdio(name, server).await,
            Mode::Http(addr) => serve_http(name, server, &addr).await,
        }
    });
    // A blocking stdin read may still be parked on tokio's blocking pool after
    // Ctrl-C; don't let it hold up process exit.
    runtime.shutdown_timeout(Duration::from_millis(250));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve_stdio<S>(name: &str, server: S) -> Result<(), String>
where
    S: ServerHandler,
{
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!("{name} serving MCP on stdio");

    let running = tokio::select! {
        res = server.serve_with_ct(rmcp::transport::stdio(), shutdown.child_token()) => match res {
            Ok(running) => running,
            Err(ServerInitializeError::ConnectionClosed(_)) => {
                tracing::info!("stdin closed before initialization; exiting");
                return Ok(());
            }
            Err(ServerInitializeError::Cancelled) => return Ok(()),
            Err(err) => return Err(format!("MCP initialization failed: {err}")),
        },
        () = shutdown.cancelled() => {
            tracing::info!("shutdown requested before initialization");
            return Ok(());
        }
    };
    match running.waiting().await {
        Ok(reason) => {
            tracing::info!(?reason, "{name} stopped");
            Ok(())
        }
        Err(err) => Err(format!("MCP service task failed: {err}")),
    }
}

async fn serve_http<S>(name: &str, server: S, addr: &str) -> Result<(), String>
where
    S: ServerHandler + Clone + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| format!("failed to bind {addr}: {err}"))?;
    let local_addr: SocketAddr = listener
        .local_addr()
        .map_err(|err| format!("failed to read the bound address: {err}"))?;

    let shutdown = CancellationToken::new();
    let mut config =
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token());
    if !local_addr.ip().is_loopback() {
        // The default Host allow-list only admits loopback names (DNS-rebinding
        // protection). Bound to a non-loopback address we cannot know which
        // names clients will use, so accept any Host header.
        tracing::warn!(%local_addr, "non-loopback bind: disabling Host header validation");
        config = config.disable_allowed_hosts();
    }
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let app = axum::Router::new().nest_service("/mcp", service);

    announce(&format!("listening on http://{local_addr}/mcp"))?;
    tracing::info!(%local_addr, "{name} serving MCP over Streamable HTTP at /mcp");

    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!("failed to set TCP_NODELAY: {err}");
        }
    });
    let graceful = shutdown.clone();
    let serve = axum::serve(listener, app)
        .with_graceful_shutdown(async move { graceful.cancelled().await })
        .into_future();
    tokio::select! {
        res = serve => res.map_err(|err| format!("HTTP server error: {err}"))?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => tracing::warn!("connections did not drain within 5s; exiting anyway"),
    }
    tracing::info!("{name} stopped");
    Ok(())
}

/// Print the single "listening" line on stdout and flush it.
fn announce(line: &str) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|err| format!("failed to write to stdout: {err}"))
}

/// Cancel `token` on Ctrl-C or (on Unix) SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {err}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::warn!("cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C, shutting down"),
        () = terminate => tracing::info!("received SIGTERM, shutting down"),
        () = token.cancelled() => return,
    }
    token.cancel();
}

/// The current UTC time as RFC 3339 (seconds precision), without a date-time dependency.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
