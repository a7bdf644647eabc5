//! Wiring: load config, build the broker, run a front, drain in order on shutdown.
//!
//! [`run`] is the HTTP broker as a library call (a listener in, a shutdown future in), so tests serve it
//! in-process; the subcommand functions (`serve`, `stdio`, `check`, `tools`) are what `cli` calls.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::Config;
use crate::front::{http, mcp::Front};

fn load(path: &std::path::Path) -> anyhow::Result<Arc<Config>> {
    Ok(Arc::new(Config::load(path)?))
}

/// `mcp-broker check`: validate the configuration (and compile its Rego policy).
pub fn check(path: &std::path::Path, for_stdio: bool) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    // The Rego policy file is part of the configuration: compile it too.
    crate::broker::build_policy(&config)?;
    // Each stdio command where its spawn will look for it.
    config.check_commands(&|k| std::env::var_os(k))?;
    if for_stdio {
        refuse_stdout_audit(path, &config)?;
    }
    println!(
        "{}: ok ({} server{})",
        path.display(),
        config.servers.len(),
        if config.servers.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Under `mcp-broker stdio`, stdout is the MCP channel: audit records cannot go there.
fn refuse_stdout_audit(path: &std::path::Path, config: &Config) -> anyhow::Result<()> {
    if config.audit.stdout {
        anyhow::bail!(
            "{}: `audit.stdout` = true cannot be used with `mcp-broker stdio`: stdout carries the MCP messages (use `audit.file`)",
            path.display()
        );
    }
    Ok(())
}

/// Reload on SIGHUP, and when the file's contents change (polled each second, if `watch_config`).
/// An invalid file is logged and ignored: the broker keeps running on the configuration it has.
async fn watch_reloads(
    path: std::path::PathBuf,
    initial: Arc<Config>,
    broker: Arc<Broker>,
    tls: Option<Arc<crate::front::tls::Tls>>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup_fired = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fired = std::future::pending::<()>();
        let why = tokio::select! {
            _ = hup_fired => "SIGHUP",
            _ = tick.tick() => {
                if !initial.broker.watch_config {
                    continue;
                }
                let now = std::fs::read(&path).ok();
                if now.is_none() || now == last {
                    continue;
                }
                "the file changed"
            }
        };
        last = std::fs::read(&path).ok();
        // SIGHUP also reads the listener's certificate again (a renewal needs no restart).
        if why == "SIGHUP"
            && let Some(t) = &tls
        {
            match t.reload() {
                Ok(()) => tracing::info!("TLS certificate read again"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; still serving the previous one")
                }
            }
        }
        reload(&path, &initial, &broker, why);
    }
}

fn reload(path: &std::path::Path, initial: &Config, broker: &Broker, why: &str) {
    let loaded = Config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|c| {
            crate::broker::build_policy(&c)?;
            Ok(c)
        });
    let mut new = match loaded {
        Ok(c) => c,
        Err(e) => {
            crate::metrics::global().reload(false);
            tracing::error!(reason = why, error = %format!("{e:#}"), "configuration reload rejected; still running the previous configuration");
            return;
        }
    };
    // The listener, identity and audit sinks are fixed for the process: keep the running ones.
    let running = broker.config();
    for (section, changed) in [
        (
            "broker",
            format!("{:?}", new.broker) != format!("{:?}", initial.broker),
        ),
        (
            "auth",
            format!("{:?}", new.auth) != format!("{:?}", initial.auth),
        ),
        ("audit", new.audit != initial.audit),
        ("cluster", new.cluster != initial.cluster),
        ("telemetry", new.telemetry != initial.telemetry),
        ("token_store", new.token_store != initial.token_store),
    ] {
        if changed {
            tracing::warn!(
                section,
                "[{section}] changed: it takes effect only after a restart"
            );
        }
    }
    new.broker = running.broker.clone();
    new.auth = running.auth.clone();
    new.audit = running.audit.clone();
    new.cluster = running.cluster.clone();
    new.telemetry = running.telemetry.clone();
    new.token_store = running.token_store.clone();
    match broker.reload(Arc::new(new)) {
        Ok(s) => tracing::info!(
            reason = why,
            added = ?s.added,
            removed = ?s.removed,
            changed = ?s.changed,
            "configuration reloaded"
        ),
        Err(e) => {
            tracing::error!(reason = why, error = %e, "configuration reload rejected; still running the previous configuration")
        }
    }
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

/// `mcp-broker serve`: check the listen address is safe to expose, bind it, announce the URL on stdout
/// (tests and scripts read that line), and [`run`] until ctrl-c or SIGTERM.
pub async fn serve(path: &std::path::Path, insecure_no_auth: bool) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
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
    let scheme = if config.broker.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let options = ServeOptions {
        config_path: Some(path.to_path_buf()),
        on_ready: Some(Box::new(move |addr| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "mcp-broker listening on {scheme}://{addr}/mcp");
            let _ = out.flush();
        })),
    };
    run(config, listener, shutdown_signal(), options).await?;
    Ok(ExitCode::SUCCESS)
}

/// What [`run`] needs besides the configuration, the listener and the shutdown trigger.
#[derive(Default)]
pub struct ServeOptions {
    /// The file the configuration came from: reloaded on SIGHUP and (with `watch_config`) when it
    /// changes. `None` (in-process tests) = no reloads.
    pub config_path: Option<PathBuf>,
    /// Called with the bound address once everything is built and requests are about to be served:
    /// the CLI announces the URL here, so a failed start never looks like a started broker.
    pub on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
}

/// Serve `config` on `listener` until `shutdown` resolves, then drain in order.
///
/// Builds the broker and starts its upstreams, serves `/mcp` and the ops routes (`/metrics`,
/// `/healthz`, `/readyz`; on `[broker] metrics_listen` instead, when set), and on shutdown: stops
/// accepting, lets calls in flight finish up to `drain_timeout` (then cancels them, audited), ends the
/// sessions, stops the upstreams (no child outlives this) and flushes the audit trail. The caller
/// chooses the trigger: a signal for the CLI, a channel for a test.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> anyhow::Result<()> {
    // Reloads compare against the file as written, before the port-0 fix-up below.
    let initial = config.clone();
    let addr = listener.local_addr()?;
    let config = with_bound_port(config, addr)?;
    // The writer task outlives nothing that matters: `flush` at the end waits for every record.
    let (audit, _writer) = Audit::start(&config.audit)?;
    crate::telemetry::start(config.telemetry.as_ref())?;
    let broker = Broker::with_tokens(config.clone(), audit.clone(), token_file(&config).await?)?;
    broker.start();
    let metrics_server = match config.broker.metrics_listen {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "metrics_listen is not a loopback address: /metrics is served without a token");
            }
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))?;
            tracing::info!(addr = %l.local_addr()?, "serving /metrics, /healthz and /readyz");
            let ops = http::ops_router(&broker);
            let limits = http::ConnectionLimits::of(&config.broker);
            Some(tokio::spawn(http::serve(
                l,
                ops,
                limits,
                std::future::pending(),
            )))
        }
        None => None,
    };
    let tls = match &config.broker.tls {
        Some(t) => Some(crate::front::tls::Tls::load(t)?),
        None => None,
    };
    let reloads = options
        .config_path
        .map(|path| tokio::spawn(watch_reloads(path, initial, broker.clone(), tls.clone())));
    let sessions = CancellationToken::new();
    let auth = match &config.auth {
        Some(a) => Some(Arc::new(Authenticator::new(a.clone())?)),
        None => None,
    };
    let posts = http::Posts::default();
    let app = http::router(broker.clone(), auth, sessions.clone(), posts.clone());
    if let Some(ready) = options.on_ready {
        ready(addr);
    }
    tracing::info!(%addr, public_url = %config.broker.public_url, servers = config.servers.len(), "serving");
    let stop = CancellationToken::new();
    let stop_rx = stop.clone();
    let mut limits = http::ConnectionLimits::of(&config.broker);
    limits.tls = tls;
    let server = tokio::spawn(http::serve(listener, app, limits, async move {
        stop_rx.cancelled().await
    }));
    shutdown.await;
    if let Some(r) = reloads {
        r.abort();
    }
    // Drain: stop accepting connections and new calls, let calls in flight finish up to the
    // deadline, then cancel the rest (audited); end sessions (their SSE streams would hold the
    // server open); stop upstreams so no child outlives the broker; flush the audit trail.
    let deadline = config.broker.drain_timeout;
    tracing::info!(?deadline, "shutting down: draining calls in flight");
    stop.cancel();
    let cancelled = broker.drain(deadline).await;
    // Results (or cancellation errors) of the drained calls are on their way to the clients:
    // let those responses finish before the sessions (and their streams) end.
    let open = posts.wait_idle(Duration::from_secs(5)).await;
    if open > 0 {
        tracing::warn!(open, "responses still open after the drain; closing them");
    }
    sessions.cancel();
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        tracing::warn!("HTTP server did not stop in time");
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    broker.shutdown().await;
    audit.flush(Duration::from_secs(5)).await;
    // After the audit flush: the records' drops ended the last spans.
    let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown).await;
    tracing::info!(cancelled, "stopped");
    Ok(())
}

/// `[token_store]`, opened (a file that does not open with its key stops the start). Under
/// `[cluster]` the broker keeps tokens in Redis instead (the two cannot be configured together).
async fn token_file(config: &Config) -> anyhow::Result<Option<crate::oauth::store::TokenStore>> {
    let Some(t) = &config.token_store else {
        return Ok(None);
    };
    let store = crate::oauth::store::TokenStore::open(t).await?;
    tracing::info!(path = %t.path.display(), "upstream tokens kept in the [token_store] file");
    Ok(Some(store))
}

/// `listen` on port 0 (tests): the default public URL (and the audience derived from it) names the
/// port actually bound.
fn with_bound_port(config: Arc<Config>, addr: SocketAddr) -> anyhow::Result<Arc<Config>> {
    if config.broker.public_url.port() != Some(0) {
        return Ok(config);
    }
    let mut c = (*config).clone();
    let old = c.broker.public_url.to_string();
    c.broker.public_url = url::Url::parse(&format!("http://{addr}/mcp"))?;
    if let Some(a) = c.auth.as_mut()
        && a.audience == old
    {
        a.audience = c.broker.public_url.to_string();
    }
    Ok(Arc::new(c))
}

/// `mcp-broker stdio`: serve one MCP session over stdin/stdout.
pub async fn stdio(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    refuse_stdout_audit(path, &config)?;
    // The writer task outlives nothing that matters: `flush` at the end waits for every record.
    let (audit, _writer) = Audit::start(&config.audit)?;
    let initial = config.clone();
    crate::telemetry::start(config.telemetry.as_ref())?;
    let broker = Broker::with_tokens(config.clone(), audit.clone(), token_file(&config).await?)?;
    broker.start();
    let reloads = tokio::spawn(watch_reloads(
        path.to_path_buf(),
        initial,
        broker.clone(),
        None,
    ));
    let running = Front::new(broker.clone())
        .serve(crate::front::relay::RawLists(
            rmcp::transport::async_rw::AsyncRwTransport::new_server(
                tokio::io::stdin(),
                tokio::io::stdout(),
            ),
        ))
        .await
        .map_err(|e| anyhow::anyhow!("stdio session failed to start: {e}"))?;
    let ct = running.cancellation_token();
    let mut waiting = std::pin::pin!(running.waiting());
    tokio::select! {
        // stdin closed: the client is gone.
        _ = &mut waiting => {}
        _ = shutdown_signal() => {
            // Drain as `serve` does: calls in flight may finish (and answer) before the session ends.
            broker.drain(config.broker.drain_timeout).await;
            // The last results are queued for stdout in rmcp's session task; give it a moment to
            // write them before the session ends (there is no signal for "written" to wait on).
            tokio::time::sleep(Duration::from_millis(250)).await;
            ct.cancel();
        }
    }
    reloads.abort();
    broker.shutdown().await;
    audit.flush(Duration::from_secs(5)).await;
    // After the audit flush: the records' drops ended the last spans.
    let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown).await;
    Ok(ExitCode::SUCCESS)
}

/// `mcp-broker tools`: connect to every upstream and print the namespaced catalog.
pub async fn tools(
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
    let broker = Broker::new(config, Audit::disabled())?;
    broker.start();
    broker.wait_connected(wait).await;
    let visible = match &caller {
        Some(c) => Some(broker.visible_tools(c).await),
        None => None,
    };
    let collisions = broker.collisions();
    let catalog = broker.catalog();
    let entries: Vec<_> = catalog
        .tools
        .entries
        .iter()
        .filter(|e| {
            visible
                .as_ref()
                .is_none_or(|v| v.contains(e.item.str("name")))
        })
        .collect();
    let down: Vec<_> = broker
        .upstreams()
        .iter()
        .filter(|u| !u.is_up())
        .map(|u| (u.name.clone(), u.last_error()))
        .collect();
    if json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.item.get("name"),
                    "server": e.server,
                    "original": e.original,
                    "title": tool_title(&e.item),
                    "description": e.item.get("description").and_then(|d| d.as_str()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let width = entries
            .iter()
            .map(|e| e.item.str("name").len())
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
            let text = tool_title(&e.item)
                .or_else(|| e.item.get("description").and_then(|d| d.as_str()))
                .unwrap_or_default();
            let first = text.lines().next().unwrap_or("");
            let short: String = if first.chars().count() > 70 {
                first.chars().take(69).chain(['…']).collect()
            } else {
                first.to_string()
            };
            println!(
                "{:width$}  {:swidth$}  {}",
                e.item.str("name"),
                e.server,
                short
            );
        }
    }
    for c in &collisions {
        eprintln!("error: {c}");
    }
    for (d, why) in &down {
        match why {
            Some(why) => eprintln!("error: server `{d}` could not be reached: {why}"),
            None => eprintln!("error: server `{d}` could not be reached (see the log above)"),
        }
    }
    broker.shutdown().await;
    Ok(if collisions.is_empty() && down.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A tool's `title`, else its `annotations.title`.
fn tool_title(item: &crate::catalog::Item) -> Option<&str> {
    item.get("title").and_then(|t| t.as_str()).or_else(|| {
        item.get("annotations")
            .and_then(|a| a.get("title"))
            .and_then(|t| t.as_str())
    })
}
