//! The catalog and what each caller is shown of it: rebuilt from the upstreams' listings, filtered
//! by the same policy decision that admits calls, announced to a session only when its own view
//! changed. A session's first list waits (up to `startup_wait`) for upstreams still starting.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::audit::CallRecord;
use crate::auth::Caller;
use crate::catalog::Kind;
use crate::catalog::{Catalog, Collision, Entry, Item, Listing};
use crate::policy::Decision;

use super::Broker;
use super::sessions::View;
use super::state::State;

impl Broker {
    /// What `caller` is shown of `cat`: a fingerprint per list kind, and the servers it may see.
    pub(super) fn view_of(&self, st: &State, cat: &Catalog, caller: &Caller) -> View {
        let servers = RefCell::new(HashSet::new());
        let lists = cat.fingerprint_where(&|kind, server, original| {
            let allow = st
                .policy
                .decide(caller, server, kind.family(), original)
                .allow;
            if allow {
                let mut s = servers.borrow_mut();
                if !s.contains(server) {
                    s.insert(Arc::from(server));
                }
            }
            allow
        });
        let mut servers = servers.into_inner();
        // A server that lists nothing is seen by whoever the policy admits to it as a whole.
        for up in &st.upstreams {
            let listed = up.listing().is_some_and(|l| !l.is_empty());
            if !listed && st.policy.decide(caller, &up.name, Kind::Tool, "").allow {
                servers.insert(up.name.clone());
            }
        }
        View { lists, servers }
    }

    /// The items of one list `caller` may see, recorded on `rec`.
    /// The list `which` as `caller` is shown it, and how long it may be cached: the smallest
    /// caching hint among the servers it merges (0 when one gave none, or it is empty).
    pub(super) fn listed(
        &self,
        caller: &Caller,
        which: Kind,
        rec: &mut CallRecord,
        legacy: bool,
        pending: &HashSet<Arc<str>>,
    ) -> (Vec<Item>, u64) {
        let st = self.state();
        let cat = self.catalog_in(legacy);
        fn keep(
            st: &State,
            caller: &Caller,
            kind: Kind,
            entries: &[Entry<Item>],
            rec: &mut CallRecord,
            listed: Kind,
            pending: &HashSet<Arc<str>>,
        ) -> (Vec<Item>, u64) {
            let mut servers: HashSet<&Arc<str>> = HashSet::new();
            let mut shown: Vec<Item> = entries
                .iter()
                .filter(|e| !pending.contains(&e.server))
                .filter(|e| st.policy.decide(caller, &e.server, kind, &e.original).allow)
                .inspect(|e| {
                    servers.insert(&e.server);
                })
                .map(|e| e.item.clone())
                .collect();
            let ttl = servers
                .iter()
                .map(|s| st.upstream(s).map_or(0, |u| u.list_ttl_ms(listed)))
                .min()
                .unwrap_or(0);
            let hidden = entries.len().saturating_sub(shown.len());
            // Per-user OAuth servers the caller has not connected: their `authorize` tool.
            if listed == Kind::Tool {
                for server in st
                    .upstreams
                    .iter()
                    .map(|u| &u.name)
                    .filter(|n| pending.contains(*n))
                {
                    if st
                        .policy
                        .decide(caller, server, Kind::Tool, super::consent::AUTHORIZE)
                        .allow
                        && let Some(item) = Broker::authorize_item(st, server)
                    {
                        shown.push(item);
                    }
                }
            }
            rec.decision(
                true,
                &format!("{} shown, {hidden} hidden by policy", shown.len()),
                None,
            );
            rec.listed(shown.len(), hidden);
            (shown, ttl)
        }
        let entries = match which {
            Kind::Tool => &cat.tools.entries,
            Kind::Prompt => &cat.prompts.entries,
            Kind::Resource => &cat.resources.entries,
            Kind::Template => &cat.templates.entries,
        };
        keep(&st, caller, which.family(), entries, rec, which, pending)
    }

    /// Wait (up to `limit` after start) until every upstream's first connect attempt has ended.
    pub(super) async fn wait_started(&self, limit: Duration) {
        let end = tokio::time::Instant::from_std(self.started + limit);
        loop {
            let changed = self.state_changed.notified();
            if self.upstreams().iter().all(|u| u.attempted()) {
                break;
            }
            // Polled as well: a notification between the check and the wait would be missed.
            let tick = tokio::time::Instant::now() + Duration::from_millis(50);
            if tokio::time::timeout_at(end.min(tick), changed)
                .await
                .is_err()
                && tokio::time::Instant::now() >= end
            {
                break;
            }
        }
        self.rebuild();
    }

    /// Before a list: wait for upstreams still starting, and for per-caller servers no caller has
    /// listed yet, connect with this caller's credential so the catalog can show their items.
    pub(super) async fn prepare_list(&self, caller: &Caller, session: Option<u64>) {
        let wait = self.config().broker.startup_wait;
        if self.started.elapsed() < wait && !self.upstreams().iter().all(|u| u.attempted()) {
            self.wait_started(wait).await;
        }
        let st = self.state();
        let mut listed = false;
        for up in st.upstreams.iter().filter(|u| u.per_caller && !u.listed()) {
            let owner = Self::owner_for(up, caller, session);
            match tokio::time::timeout(
                up.config.connect_timeout,
                self.connection_for(&st, up, caller, &owner, None, false),
            )
            .await
            {
                Ok(Ok(_)) => listed = true,
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(server = %up.name, "listing a per-caller server timed out")
                }
            }
        }
        if listed {
            self.rebuild();
        }
    }

    /// Rebuild the catalog from the upstreams' listings; queue list_changed for the sessions whose
    /// own view changed (a reload can change the policy without changing the catalog, so always
    /// check).
    pub(super) fn rebuild(&self) -> Vec<Collision> {
        self.rebuild_announced(None)
    }

    /// [`Self::rebuild`] after `server` announced that its `kind` list changed: the announcement is
    /// relayed to whoever may see that server even when what they are shown came out the same (the
    /// upstream said so; a client may re-read for reasons the broker cannot see).
    pub(super) fn rebuild_announced(&self, announced: Option<(&Arc<str>, Kind)>) -> Vec<Collision> {
        let st = self.state();
        let mut listings: HashMap<Arc<str>, Listing> = HashMap::new();
        for up in &st.upstreams {
            if let Some(l) = up.listing() {
                listings.insert(up.name.clone(), l);
            }
        }
        let mut held = super::guard::Held::default();
        self.screen(&st, &mut listings, &mut held);
        let old = self.catalog();
        let (new, collisions) = Catalog::build(
            &st.namespaces,
            &listings,
            &st.config.broker.separator,
            Some(&old),
        );
        for c in &collisions {
            tracing::warn!(kind = c.kind, name = %c.name, kept = %c.kept, dropped = %c.dropped, "name collision: entry left out");
        }
        let (before, after) = (old.fingerprint(), new.fingerprint());
        let new = Arc::new(new);
        if let Ok(mut slot) = self.catalog.write() {
            *slot = new.clone();
        }
        // Servers with a separate 2025-11-25 connection list for 2025-era clients from it.
        let legacy = if st.upstreams.iter().any(|u| u.has_legacy()) {
            let mut legacy = HashMap::new();
            for up in st.upstreams.iter().filter(|u| u.has_legacy()) {
                if let Some(l) = up.listing_in(true) {
                    legacy.insert(up.name.clone(), l);
                }
            }
            self.screen(&st, &mut legacy, &mut held);
            listings.extend(legacy);
            let old = self.catalog_in(true);
            let (cat, _) = Catalog::build(
                &st.namespaces,
                &listings,
                &st.config.broker.separator,
                Some(&old),
            );
            Arc::new(cat)
        } else {
            new.clone()
        };
        if let Ok(mut slot) = self.catalog_legacy.write() {
            *slot = legacy.clone();
        }
        self.set_held(held);
        for (i, k) in Kind::LISTED.iter().enumerate() {
            if before[i] != after[i] {
                let _ = self.changes.send((*k, None));
            }
        }
        if let Some((server, kind)) = announced {
            let _ = self.changes.send((kind, Some(server.clone())));
        }
        // Sessions of the same caller share one computation (many sessions, few callers).
        let mut views: HashMap<String, Vec<(Caller, View)>> = HashMap::new();
        for s in self.sessions.all() {
            let known = views
                .get(&s.caller.sub)
                .and_then(|v| v.iter().find(|(c, _)| *c == s.caller))
                .map(|(_, v)| v.clone());
            let view = match known {
                Some(v) => v,
                None => {
                    let v = self.view_of(&st, &legacy, &s.caller);
                    views
                        .entry(s.caller.sub.clone())
                        .or_default()
                        .push((s.caller.clone(), v.clone()));
                    v
                }
            };
            let Ok(mut seen) = s.view.lock() else {
                continue;
            };
            let told = announced
                .filter(|(server, _)| view.servers.contains(*server))
                .map(|(_, k)| k.index());
            let changed: Vec<Kind> = (0..3)
                .filter(|&i| seen.lists[i] != view.lists[i] || told == Some(i))
                .map(|i| Kind::LISTED[i])
                .collect();
            *seen = view;
            drop(seen);
            for k in changed {
                self.sessions.list_changed(&s, k);
            }
        }
        collisions
    }

    /// Collisions in the current view (for `mcp-broker tools`).
    pub fn collisions(&self) -> Vec<Collision> {
        self.rebuild()
    }

    /// For the HTTP front's step-up answer: the policy decision on a `tools/call` of `exposed`, when a
    /// `step_up` rule refuses it (then the call gets HTTP 403 instead of an `isError` result).
    pub fn step_up_refusal(
        &self,
        caller: &Caller,
        exposed: &str,
        request_id: &serde_json::Value,
    ) -> Option<Decision> {
        let st = self.state();
        if !st.policy.has_step_up() {
            return None;
        }
        let cat = self.catalog();
        let e = cat.tools.get(exposed)?;
        let d = st.policy.decide(caller, &e.server, Kind::Tool, &e.original);
        if d.step_up.is_none() || d.allow {
            return None;
        }
        // The elevation request is a decision too (SB-7): record what was asked and what was held.
        let mut rec = self.audit.begin(caller, "tool", exposed);
        rec.request(request_id.clone(), None);
        rec.route(&e.server, &e.original);
        rec.listed_name();
        let wanted = d.step_up.as_deref().unwrap_or_default().join(" ");
        rec.decision(
            false,
            &format!(
                "step-up required: scope \"{wanted}\" (token has \"{}\"): {}",
                caller.scopes.join(" "),
                d.reason
            ),
            Some(d.label()),
        );
        Some(d)
    }

    /// A fingerprint per list kind (tools, prompts, resources) of what `caller` is shown: a 2026-07-28
    /// `subscriptions/listen` stream announces a change only when its caller's own view changed.
    pub fn list_view(&self, caller: &Caller) -> [u64; 3] {
        self.view_of(&self.state(), &self.catalog(), caller).lists
    }

    /// May `caller` see anything of `server` (and so hear what it announces)?
    pub fn sees_server(&self, caller: &Caller, server: &str) -> bool {
        self.view_of(&self.state(), &self.catalog(), caller)
            .servers
            .contains(server)
    }

    /// The exposed tool names `caller` may see, after connecting per-caller servers for it (for
    /// `mcp-broker tools --token`; not audited).
    pub async fn visible_tools(&self, caller: &Caller) -> HashSet<String> {
        self.prepare_list(caller, None).await;
        let st = self.state();
        self.catalog()
            .tools
            .entries
            .iter()
            .filter(|e| {
                st.policy
                    .decide(caller, &e.server, Kind::Tool, &e.original)
                    .allow
            })
            .map(|e| e.item.str("name").to_string())
            .collect()
    }

    pub fn has_step_up(&self) -> bool {
        self.state().policy.has_step_up()
    }
}
