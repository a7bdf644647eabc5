//! `mcp-broker pin` and `mcp-broker check --pins`: connect to the upstreams as `tools` does, hash
//! each one's own tool definitions (the objects it listed, before the broker renamed them), then
//! write `servers.lock` or compare against it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::Audit;
use crate::broker::Broker;
use crate::catalog::TOOL_KEY;
use crate::config::Config;
use crate::guard::pins::{Drift, Lock, definition_hash};

/// What `pin` was asked to do.
#[derive(Debug, Default)]
pub struct PinArgs {
    /// Only these servers (all when empty).
    pub servers: Vec<String>,
    /// `SERVER/TOOL`: re-pin only these to their current definition.
    pub accept: Vec<String>,
    /// Who pins (default: $USER).
    pub by: Option<String>,
}

/// Each listed server's tools as `(upstream name, definition hash)`, in config order; servers
/// that could not be listed, with why.
struct Definitions {
    listed: Vec<(String, Vec<(String, String)>)>,
    skipped: Vec<(String, String)>,
}

/// The lock file the config names (`[guard] pins`), else `servers.lock` next to the config.
pub fn lock_path(config_path: &Path, config: &Config) -> PathBuf {
    config.guard.pins.clone().unwrap_or_else(|| {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("servers.lock")
    })
}

async fn definitions(config: &Config, only: &[String]) -> anyhow::Result<Definitions> {
    for s in only {
        if config.server(s).is_none() {
            anyhow::bail!("no server `{s}` in the configuration");
        }
    }
    // This broker must see what the upstreams list, not what the current pins let through.
    let mut config = config.clone();
    config.guard.pins = None;
    config.guard.scan_descriptions = None;
    let wait = config
        .servers
        .iter()
        .map(|s| s.connect_timeout)
        .max()
        .unwrap_or(Duration::from_secs(30));
    let broker = Broker::new(Arc::new(config), Audit::disabled())?;
    broker.start();
    broker.wait_connected(wait).await;
    let mut out = Definitions {
        listed: Vec::new(),
        skipped: Vec::new(),
    };
    for up in broker.upstreams() {
        if !only.is_empty() && !only.iter().any(|s| **s == *up.name) {
            continue;
        }
        if up.per_caller {
            out.skipped.push((
                up.name.to_string(),
                "connects per caller, so it cannot be listed without one".into(),
            ));
            continue;
        }
        match up.listing().filter(|_| up.is_up()) {
            Some(l) => {
                let tools = l
                    .tools
                    .iter()
                    .filter(|t| up.config.tools.admits(t.str(TOOL_KEY)))
                    .map(|t| (t.str(TOOL_KEY).to_string(), definition_hash(t.object())))
                    .collect();
                out.listed.push((up.name.to_string(), tools));
            }
            None => out.skipped.push((
                up.name.to_string(),
                format!(
                    "could not be reached: {}",
                    up.last_error()
                        .unwrap_or_else(|| "see the log above".into())
                ),
            )),
        }
    }
    broker.shutdown().await;
    Ok(out)
}

/// `mcp-broker pin`: pin every tool of the selected servers, or (`--accept`) only the named ones.
pub async fn pin(path: &Path, args: &PinArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let lock_at = lock_path(path, &config);
    let mut lock = Lock::load(&lock_at)?;
    let mut accept = Vec::new();
    for a in &args.accept {
        let Some((server, tool)) = a
            .split_once('/')
            .filter(|(s, t)| !s.is_empty() && !t.is_empty())
        else {
            anyhow::bail!("--accept `{a}`: use SERVER/TOOL");
        };
        accept.push((server.to_string(), tool.to_string()));
    }
    // With --accept, only the servers named there are listed.
    let mut only = args.servers.clone();
    for (s, _) in &accept {
        if !only.contains(s) {
            only.push(s.clone());
        }
    }
    let defs = definitions(&config, &only).await?;
    let by = args
        .by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let at = crate::audit::now_rfc3339();
    let mut pinned = 0;
    if accept.is_empty() {
        for (server, tools) in &defs.listed {
            // A full pin replaces the server's pins: tools it no longer lists are dropped.
            lock.servers.remove(server);
            for (tool, hash) in tools {
                lock.pin(server, tool, hash, &at, &by);
                pinned += 1;
            }
            println!("pinned {} tool(s) of `{server}`", tools.len());
        }
    } else {
        for (server, tool) in &accept {
            let Some((_, tools)) = defs.listed.iter().find(|(s, _)| s == server) else {
                anyhow::bail!("--accept {server}/{tool}: `{server}` could not be listed");
            };
            match tools.iter().find(|(t, _)| t == tool) {
                Some((_, hash)) => {
                    lock.pin(server, tool, hash, &at, &by);
                    println!("accepted `{server}/{tool}` ({})", &hash[..12]);
                }
                None => {
                    // Accepting a removal: the pin goes.
                    let removed = lock
                        .servers
                        .get_mut(server)
                        .and_then(|t| t.remove(tool))
                        .is_some();
                    if !removed {
                        anyhow::bail!(
                            "--accept {server}/{tool}: `{server}` lists no tool `{tool}`"
                        );
                    }
                    println!("accepted the removal of `{server}/{tool}`");
                }
            }
            pinned += 1;
        }
    }
    for (server, why) in &defs.skipped {
        eprintln!("note: server `{server}` skipped: {why}");
    }
    lock.save(&lock_at)?;
    println!("{}: {pinned} pin(s) written", lock_at.display());
    // A selected server that could not be listed is not pinned: say so in the exit code.
    let missed = defs.skipped.iter().any(|(s, _)| {
        only.contains(s)
            || (only.is_empty()
                && config
                    .server(s)
                    .is_some_and(|c| c.isolation == crate::config::Isolation::Shared))
    });
    Ok(if missed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `mcp-broker check --pins`: list every drift (changed, new, removed); non-zero when there is one
/// or a pinned server could not be listed.
pub async fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let lock_at = lock_path(path, &config);
    let lock = Lock::load(&lock_at)?;
    let defs = definitions(&config, &[]).await?;
    let mut drifts = 0;
    for (server, tools) in &defs.listed {
        if !lock.covers(server) {
            println!("{server}: not pinned");
            continue;
        }
        let found = lock.drifts(server, tools);
        if found.is_empty() {
            println!("{server}: {} tool(s) match their pins", tools.len());
        }
        for (tool, d) in &found {
            drifts += 1;
            let detail = match d {
                Drift::Changed { pinned, current } => {
                    format!(
                        "pinned {} now {}",
                        &pinned[..12.min(pinned.len())],
                        &current[..12]
                    )
                }
                Drift::Unpinned { current } => format!("not pinned, now {}", &current[..12]),
                Drift::Removed { pinned } => {
                    format!(
                        "pinned {}, no longer listed",
                        &pinned[..12.min(pinned.len())]
                    )
                }
            };
            println!("{server}/{tool}: {} ({detail})", d.as_str());
        }
    }
    let mut unlisted = 0;
    for (server, why) in &defs.skipped {
        if lock.covers(server) {
            unlisted += 1;
            eprintln!("error: pinned server `{server}` {why}");
        } else {
            eprintln!("note: server `{server}` skipped: {why}");
        }
    }
    println!("{}: {drifts} drift(s)", lock_at.display());
    Ok(if drifts == 0 && unlisted == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
