//! The one decision that both filters lists and admits calls, so a caller is never shown a tool it
//! cannot call nor refused one it was shown. Pure and synchronous.
//!
//! Semantics: a rule *applies* to an item when its `servers` glob matches and its selector for that
//! kind matches (a rule with none of `tools`/`prompts`/`resources` applies to every kind; a rule with
//! only `tools` applies only to tools). Rules are tried in order and the first that applies decides:
//! `allow` allows when every condition holds and otherwise refuses with its message; `deny` refuses
//! when every condition holds (no conditions = always) and otherwise lets the next rule decide.
//! When no rule applies: refuse if inbound auth is on, allow if not.

use crate::auth::Caller;
use crate::config::{Effect, PolicyRule};

/// What is being decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Prompt,
    Resource,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Prompt => "prompt",
            Kind::Resource => "resource",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Shown to the caller when refused, and recorded.
    pub reason: String,
    /// The 1-based rule that decided; `None` = the default.
    pub rule: Option<usize>,
    /// Refused by a `step_up` rule: the scopes to ask the user for (HTTP 403 insufficient_scope).
    pub step_up: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<PolicyRule>,
    /// With inbound auth, what no rule allows is refused.
    default_deny: bool,
}

impl Policy {
    pub fn new(rules: Vec<PolicyRule>, auth_enabled: bool) -> Self {
        Self {
            rules,
            default_deny: auth_enabled,
        }
    }

    pub fn has_step_up(&self) -> bool {
        self.rules.iter().any(|r| r.step_up)
    }

    /// May `caller` see and use `name` (the upstream's own name or URI) of `kind` on `server`?
    pub fn decide(&self, caller: &Caller, server: &str, kind: Kind, name: &str) -> Decision {
        for r in &self.rules {
            if !applies(r, server, kind, name) {
                continue;
            }
            let holds = conditions_hold(r, caller);
            match (r.effect, holds) {
                (Effect::Allow, true) => {
                    return Decision {
                        allow: true,
                        reason: format!("allowed by policy rule {}", r.number),
                        rule: Some(r.number),
                        step_up: None,
                    };
                }
                (Effect::Allow, false) | (Effect::Deny, true) => {
                    return Decision {
                        allow: false,
                        reason: r
                            .message
                            .clone()
                            .unwrap_or_else(|| refusal(r, kind, name, caller)),
                        rule: Some(r.number),
                        step_up: (r.step_up && r.effect == Effect::Allow)
                            .then(|| r.require_scopes.clone()),
                    };
                }
                (Effect::Deny, false) => continue,
            }
        }
        if self.default_deny {
            Decision {
                allow: false,
                reason: format!(
                    "no policy rule allows {} `{name}` on server `{server}`",
                    kind.as_str()
                ),
                rule: None,
                step_up: None,
            }
        } else {
            Decision {
                allow: true,
                reason: "allowed: no policy rule applies and inbound auth is off".into(),
                rule: None,
                step_up: None,
            }
        }
    }
}

fn applies(r: &PolicyRule, server: &str, kind: Kind, name: &str) -> bool {
    if r.servers.as_ref().is_some_and(|g| !g.matches(server)) {
        return false;
    }
    let any_selector = r.tools.is_some() || r.prompts.is_some() || r.resources.is_some();
    if !any_selector {
        return true;
    }
    let selector = match kind {
        Kind::Tool => &r.tools,
        Kind::Prompt => &r.prompts,
        Kind::Resource => &r.resources,
    };
    selector.as_ref().is_some_and(|g| g.matches(name))
}

fn conditions_hold(r: &PolicyRule, caller: &Caller) -> bool {
    r.require_scopes.iter().all(|s| caller.has_scope(s))
        && r.claims.iter().all(|(k, v)| caller.claim_matches(k, v))
}

fn refusal(r: &PolicyRule, kind: Kind, name: &str, caller: &Caller) -> String {
    let missing: Vec<&str> = r
        .require_scopes
        .iter()
        .filter(|s| !caller.has_scope(s))
        .map(String::as_str)
        .collect();
    if r.effect == Effect::Allow && !missing.is_empty() {
        format!(
            "{} `{name}` requires the scope(s) {} (policy rule {})",
            kind.as_str(),
            missing.join(" "),
            r.number
        )
    } else {
        format!(
            "{} `{name}` is refused by policy rule {}",
            kind.as_str(),
            r.number
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;
    use std::sync::Arc;

    fn policy(rules: &str, auth: bool) -> Policy {
        let c = Config::parse(Path::new("p.toml"), rules, &|_| None).unwrap();
        Policy::new(c.policy, auth)
    }

    fn caller(scopes: &[&str], groups: &[&str]) -> Caller {
        let mut claims = serde_json::Map::new();
        claims.insert("groups".into(), serde_json::json!(groups));
        Caller {
            sub: "u".into(),
            client_id: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            act: vec![],
            claims: Arc::new(claims),
            authenticated: true,
        }
    }

    const SEED: &str = r#"
[[policy]]
servers = ["ledger"]
tools = ["get_customer_pii"]
require_scopes = ["pii:read"]
message = "PII access requires the pii:read scope."
[[policy]]
servers = ["ledger"]
tools = ["get_audit_log"]
require_scopes = ["audit:read"]
step_up = true
[[policy]]
effect = "deny"
claims = { groups = "contractors" }
message = "Contractors may not use the broker."
[[policy]]
servers = ["ledger", "directory"]
"#;

    #[test]
    fn first_applicable_rule_decides() {
        let p = policy(SEED, true);
        let bob = caller(&["mcp:tools"], &[]);
        let alice = caller(&["mcp:tools", "pii:read", "audit:read"], &[]);
        let d = p.decide(&bob, "ledger", Kind::Tool, "get_customer_pii");
        assert!(!d.allow);
        assert_eq!(d.reason, "PII access requires the pii:read scope.");
        assert_eq!(d.rule, Some(1));
        assert!(
            p.decide(&alice, "ledger", Kind::Tool, "get_customer_pii")
                .allow
        );
        let d = p.decide(&bob, "ledger", Kind::Tool, "get_audit_log");
        assert_eq!(d.step_up, Some(vec!["audit:read".to_string()]));
        assert!(d.reason.contains("audit:read"), "{}", d.reason);
        assert!(p.decide(&bob, "ledger", Kind::Tool, "list_accounts").allow);
        // A tools-only rule does not apply to prompts: the catch-all decides.
        assert!(
            p.decide(&bob, "ledger", Kind::Prompt, "get_customer_pii")
                .allow
        );
    }

    #[test]
    fn deny_rules_fall_through_when_conditions_fail() {
        let p = policy(SEED, true);
        let contractor = caller(&["mcp:tools", "pii:read"], &["contractors"]);
        let d = p.decide(&contractor, "ledger", Kind::Tool, "list_accounts");
        assert!(!d.allow);
        assert_eq!(d.rule, Some(3));
        assert!(
            p.decide(
                &caller(&[], &["staff"]),
                "directory",
                Kind::Tool,
                "lookup_user"
            )
            .allow
        );
    }

    #[test]
    fn default_depends_on_auth() {
        let p = policy(SEED, true);
        let d = p.decide(&caller(&[], &[]), "other", Kind::Tool, "x");
        assert!(!d.allow && d.rule.is_none());
        let open = policy("", false);
        assert!(
            open.decide(&Caller::anonymous(), "other", Kind::Tool, "x")
                .allow
        );
    }
}
