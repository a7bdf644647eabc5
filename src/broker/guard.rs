//! `[guard]` at run time: pinned definitions and description findings decide which upstream tools
//! enter the catalog. Applied to the upstreams' own listings just before the catalog is built
//! ([`Broker::screen`], from `rebuild_announced`), so lists, views, fingerprints and list_changed
//! all follow from the one catalog; a call to a held tool is refused right after `resolve`
//! ([`Broker::held_refusal`]) with the reason and how to accept it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::auth::Caller;
use crate::catalog::{Listing, TOOL_KEY, expose_name};
use crate::config::{OnDrift, Scan};
use crate::guard::pins::{Drift, definition_hash};
use crate::guard::scan::{Finding, scan_tool};
use crate::metrics;

use super::Broker;
use super::state::State;

/// Tools kept out of the catalog, and why.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// (server, the upstream's tool name) → the refusal a call gets.
    reasons: HashMap<(Arc<str>, String), String>,
    /// The name the tool would be exposed as → (server, upstream name): a call by that name is
    /// told why the tool is gone instead of being told it never existed.
    exposed: HashMap<String, (Arc<str>, String)>,
}

/// What the guard remembers between catalog rebuilds.
#[derive(Default)]
pub(super) struct GuardMemory {
    held: RwLock<Arc<Held>>,
    /// (server, tool, definition hash, what) already audited: a finding is recorded when first
    /// detected, not on every rebuild.
    reported: Mutex<HashSet<Report>>,
    /// Findings by definition hash: a definition is scanned once.
    scans: Mutex<HashMap<String, Arc<Vec<Finding>>>>,
}

/// (server, tool, definition hash, `pin` or `scan`).
type Report = (Arc<str>, String, String, &'static str);

/// Bounds on the memories above: past this many entries they start over (at worst a finding is
/// audited again).
const MEMORY_CAP: usize = 10_000;

impl Broker {
    /// Remove the tools `[guard]` holds from `listings` (the upstreams' own, before renaming),
    /// adding them to `held`; audit and count each drift or finding when first seen.
    pub(super) fn screen(
        &self,
        st: &State,
        listings: &mut HashMap<Arc<str>, Listing>,
        held: &mut Held,
    ) {
        let guard = &st.config.guard;
        let lock = st.pins.as_deref();
        if lock.is_none() && guard.scan_descriptions.is_none() {
            return;
        }
        for ns in &st.namespaces {
            let Some(listing) = listings.get_mut(&ns.server) else {
                continue;
            };
            let pinned = lock.filter(|l| l.covers(&ns.server));
            if pinned.is_none() && guard.scan_descriptions.is_none() {
                continue;
            }
            let server = &ns.server;
            listing.tools.retain(|tool| {
                let name = tool.str(TOOL_KEY);
                // A tool the config filters out is never exposed: nothing to check.
                if !ns.tools.admits(name) {
                    return true;
                }
                let hash = definition_hash(tool.object());
                let mut hold = None;
                if let Some(drift) = pinned.and_then(|l| l.drift(server, name, &hash)) {
                    let hide = guard.on_drift == OnDrift::Hide;
                    let what = match &drift {
                        Drift::Unpinned { .. } => "is new since its server was pinned",
                        _ => "changed since it was pinned",
                    };
                    let reason = format!(
                        "the definition of tool `{name}` on server `{server}` {what}; an operator can accept it with `mcp-broker pin --accept {server}/{name}`"
                    );
                    if self.first_report(server, name, &hash, "pin") {
                        tracing::warn!(server = %server, tool = name, drift = drift.as_str(), hidden = hide, "tool definition differs from its pin");
                        metrics::global().pin_drift(server, drift.as_str());
                        self.guard_record("pin", server, name, !hide, &reason);
                    }
                    if hide {
                        hold = Some(reason);
                    }
                }
                if let Some(mode) = guard.scan_descriptions {
                    let findings = self.findings(&hash, tool.object());
                    if !findings.is_empty() {
                        let list: Vec<String> = findings.iter().map(Finding::to_string).collect();
                        let reason = format!(
                            "the description of tool `{name}` on server `{server}` looks like injected instructions: {}",
                            list.join("; ")
                        );
                        if self.first_report(server, name, &hash, "scan") {
                            tracing::warn!(server = %server, tool = name, findings = %list.join("; "), "tool description looks like injected instructions");
                            for f in findings.iter() {
                                metrics::global().description_finding(server, f.kind.as_str());
                            }
                            if mode != Scan::Warn {
                                self.guard_record("scan", server, name, mode == Scan::Flag, &reason);
                            }
                        }
                        if mode == Scan::Hide && hold.is_none() {
                            hold = Some(reason);
                        }
                    }
                }
                let Some(reason) = hold else {
                    return true;
                };
                let exposed = expose_name(&ns.prefix, &st.config.broker.separator, name);
                held.exposed
                    .insert(exposed, (server.clone(), name.to_string()));
                held.reasons
                    .insert((server.clone(), name.to_string()), reason);
                false
            });
        }
    }

    /// Make `held` the current set (after a rebuild).
    pub(super) fn set_held(&self, held: Held) {
        if let Ok(mut h) = self.guard.held.write() {
            *h = Arc::new(held);
        }
    }

    /// Where a call to the exposed name of a held tool goes (it is not in the catalog).
    pub(super) fn held_route(&self, exposed: &str) -> Option<(Arc<str>, String)> {
        let held = self.guard.held.read().ok()?.clone();
        held.exposed.get(exposed).cloned()
    }

    /// The refusal for a call to `tool` of `server`, when `[guard]` holds it.
    pub(super) fn held_refusal(&self, server: &str, tool: &str) -> Option<String> {
        let held = self.guard.held.read().ok()?.clone();
        held.reasons
            .get(&(Arc::from(server), tool.to_string()))
            .cloned()
    }

    fn first_report(&self, server: &Arc<str>, tool: &str, hash: &str, what: &'static str) -> bool {
        let Ok(mut seen) = self.guard.reported.lock() else {
            return true;
        };
        if seen.len() >= MEMORY_CAP {
            seen.clear();
        }
        seen.insert((server.clone(), tool.to_string(), hash.to_string(), what))
    }

    fn findings(&self, hash: &str, tool: &crate::catalog::Object) -> Arc<Vec<Finding>> {
        if let Some(f) = self
            .guard
            .scans
            .lock()
            .ok()
            .and_then(|s| s.get(hash).cloned())
        {
            return f;
        }
        let f = Arc::new(scan_tool(tool));
        if let Ok(mut s) = self.guard.scans.lock() {
            if s.len() >= MEMORY_CAP {
                s.clear();
            }
            s.insert(hash.to_string(), f.clone());
        }
        f
    }

    /// A standalone audit record for a guard decision on a tool (no caller: the broker decided).
    fn guard_record(
        &self,
        kind: &'static str,
        server: &str,
        tool: &str,
        allow: bool,
        reason: &str,
    ) {
        let mut rec = self.audit.begin(&Caller::anonymous(), kind, tool);
        rec.route(server, tool);
        rec.decision(allow, reason, Some("guard".into()));
        if allow {
            rec.finish(crate::audit::Outcome::Ok, None);
        }
    }
}
