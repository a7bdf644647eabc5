//! Wiring: load config, build the broker, run a front, drain in order on shutdown.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::cli::Command;
use crate::config::Config;
use crate::front::{http, mcp::Front};

pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Check { config } => check(&config),
        Command::Serve {
            config,
            insecure_no_auth,
        } => serve(&config, insecure_no_auth).await,
        Command::Stdio { config } => stdio(&config).await,
        Command::Tools {
            config,
            json,
            token,
        } => tools(&config, json, token.as_deref()).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcp-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Arc<Config>> {
    Ok(Arc::new(Config::load(path)?))
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    // The Rego policy file is part of the configuration: compile it too.
    crate::broker::build_policy(&config)?;
    println!(
        "{}: ok ({} server{})",
        path.display(),
        config.servers.len(),
        if config.servers.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn serve(path: &std::path::Path, insecure_no_auth: bool) -> anyhow::Result<ExitCode> {
    let mut config = load(path)?;
    let listen = config.broker.listen;
    if !listen.ip().is_loopback() && config.auth.is_none() {
        if !insecure_no_auth {
            anyhow::bail!(
                "{}: `broker.listen` = {listen} is not a loopback address and inbound authentication is not configured; \
                 refusing to expose unauthenticated MCP servers (pass --insecure-no-auth to do it anyway)",
                path.display()
            );
        }
        tracing::warn!(%listen, "SERVING WITHOUT AUTHENTICATION ON A NON-LOOPBACK ADDRESS: anyone who can reach it can call every upstream tool");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    if config.broker.public_url.port() == Some(0) {
        // `listen` on port 0 (tests): the default public URL names the port actually bound.
        let mut c = (*config).clone();
        let old = c.broker.public_url.to_string();
        c.broker.public_url = url::Url::parse(&format!("http://{addr}/mcp"))?;
        if let Some(a) = c.auth.as_mut()
            && a.audience == old
        {
            a.audience = c.broker.public_url.to_string();
        }
        config = Arc::new(c);
    }
    let broker = Broker::new(config.clone())?;
    broker.start();
    let sessions = CancellationToken::new();
    let auth = match &config.auth {
        Some(a) => Some(Arc::new(Authenticator::new(a.clone())?)),
        None => None,
    };
    let app = http::router(broker.clone(), auth, sessions.clone());
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "mcp-broker listening on http://{addr}/mcp");
        let _ = out.flush();
    }
    tracing::info!(%addr, public_url = %config.broker.public_url, servers = config.servers.len(), "serving");
    let stop = CancellationToken::new();
    let stop_rx = stop.clone();
    let server = tokio::spawn(http::serve(listener, app, async move {
        stop_rx.cancelled().await
    }));
    shutdown_signal().await;
    tracing::info!("shutting down");
    // Order: end sessions (their SSE streams would hold graceful shutdown open), stop accepting,
    // then stop upstreams so no child outlives the broker.
    sessions.cancel();
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        tracing::warn!("HTTP server did not stop in time");
    }
    broker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn stdio(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    let broker = Broker::new(config)?;
    broker.start();
    let running = Front::new(broker.clone())
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("stdio session failed to start: {e}"))?;
    let ct = running.cancellation_token();
    tokio::select! {
        // stdin closed: the client is gone.
        _ = running.waiting() => {}
        _ = shutdown_signal() => ct.cancel(),
    }
    broker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn tools(
    path: &std::path::Path,
    json: bool,
    token: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    // Whose view: the token's caller, or (no token) the operator's view of everything.
    let caller = match (token, &config.auth) {
        (Some(t), Some(a)) => Some(
            Authenticator::new(a.clone())?
                .authenticate(t)
                .await
                .map_err(|e| anyhow::anyhow!("the token was not accepted: {e}"))?,
        ),
        (Some(_), None) => anyhow::bail!(
            "{}: --token needs an [auth] section to validate it against",
            path.display()
        ),
        (None, _) => None,
    };
    let wait = config
        .servers
        .iter()
        .map(|s| s.connect_timeout)
        .max()
        .unwrap_or(Duration::from_secs(30));
    let broker = Broker::new(config)?;
    broker.start();
    broker.wait_connected(wait).await;
    if let Some(c) = &caller {
        broker.prepare(c).await;
    }
    let collisions = broker.collisions();
    let catalog = broker.catalog();
    let visible: Option<std::collections::HashSet<String>> = caller.as_ref().map(|c| {
        broker
            .list_tools(c)
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    });
    let entries: Vec<_> = catalog
        .tools
        .entries
        .iter()
        .filter(|e| {
            visible
                .as_ref()
                .is_none_or(|v| v.contains(e.item.name.as_ref()))
        })
        .collect();
    let down: Vec<_> = broker
        .upstreams()
        .iter()
        .filter(|u| !u.is_up())
        .map(|u| u.name.clone())
        .collect();
    if json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.item.name,
                    "server": e.server,
                    "original": e.original,
                    "title": e.item.title.as_ref().or(e.item.annotations.as_ref().and_then(|a| a.title.as_ref())),
                    "description": e.item.description,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let width = entries
            .iter()
            .map(|e| e.item.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let swidth = broker
            .upstreams()
            .iter()
            .map(|u| u.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        println!("{:width$}  {:swidth$}  DESCRIPTION", "NAME", "SERVER");
        for e in &entries {
            let text = e
                .item
                .title
                .clone()
                .or_else(|| e.item.description.as_ref().map(|d| d.to_string()))
                .unwrap_or_default();
            let first = text.lines().next().unwrap_or("");
            let short: String = if first.chars().count() > 70 {
                first.chars().take(69).chain(['…']).collect()
            } else {
                first.to_string()
            };
            println!("{:width$}  {:swidth$}  {}", e.item.name, e.server, short);
        }
    }
    for c in &collisions {
        eprintln!("error: {c}");
    }
    for d in &down {
        eprintln!("error: server `{d}` could not be reached (see the log above)");
    }
    broker.shutdown().await;
    Ok(if collisions.is_empty() && down.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
