//! The one decision that both filters lists and admits calls, so a caller is never shown a tool it
//! cannot call nor refused one it was shown. Pure and synchronous.
//!
//! Semantics: a rule *applies* to an item when its `servers` glob matches and its selector for that
//! kind matches (a rule with none of `tools`/`prompts`/`resources` applies to every kind; a rule with
//! only `tools` applies only to tools). Rules are tried in order and the first that applies decides:
//! `allow` allows when every condition holds and otherwise refuses with its message; `deny` refuses
//! when every condition holds (no conditions = always) and otherwise lets the next rule decide.
//! When no rule applies: refuse if inbound auth is on, allow if not.
//!
//! Resource selectors match the URI in its normal form ([`crate::config::normalise_uri`]: scheme and
//! host lower-cased, unreserved escapes decoded, dot segments removed), with `*` inside one path
//! segment and `**` across `/`, so another spelling of a denied URI is denied too. A URI whose dot
//! segments readers resolve differently (`ledger://public/../secret/x`) is refused outright whenever
//! a decision depends on URIs. Tool and prompt names are matched as they are.

use crate::audit::clip;
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::auth::Caller;
use std::sync::Arc;

use crate::config::{ApprovalRule, Effect, PolicyRule, RegoConfig, normalise_uri};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read the Rego policy: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// regorus' own message names the file, line and column.
    #[error("{0}")]
    Rego(String),
}

/// An OPA Rego policy, evaluated with `regorus`. Input document:
/// `{caller: {sub, client_id, scopes, groups, act, claims, authenticated}, server, kind, name, uri,
/// arguments}` (`uri` is the normalised resource URI, `null` for tools and prompts; `arguments` is
/// `null` when deciding list visibility). The query yields
/// `{"allowed": bool, "message": string}` (OPA's result shape) or a plain boolean.
pub struct RegoPolicy {
    engine: Mutex<regorus::Engine>,
    query: String,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy")
            .field("query", &self.query)
            .finish()
    }
}

impl RegoPolicy {
    pub fn load(cfg: &RegoConfig) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(&cfg.path).map_err(|source| PolicyError::Read {
            path: cfg.path.clone(),
            source,
        })?;
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(cfg.path.display().to_string(), text)
            .map_err(|e| PolicyError::Rego(e.to_string()))?;
        let me = Self {
            engine: Mutex::new(engine),
            query: cfg.query.clone(),
        };
        // Evaluate once so a query naming a missing rule is a load error, not a refusal per call.
        me.eval(serde_json::json!({
            "caller": {"sub": "check", "scopes": [], "groups": [], "act": [], "claims": {}, "authenticated": false},
            "server": "", "kind": "tool", "name": "", "arguments": null
        }))
        .map_err(PolicyError::Rego)?;
        Ok(me)
    }

    /// (allowed, message)
    fn eval(&self, input: Value) -> Result<(bool, Option<String>), String> {
        let mut engine = self
            .engine
            .lock()
            .map_err(|_| "policy engine poisoned".to_string())?;
        engine.set_input(regorus::Value::from(input));
        let v = engine
            .eval_rule(self.query.clone())
            .map_err(|e| format!("evaluating {}: {e}", self.query))?;
        let json = serde_json::to_value(&v).unwrap_or(Value::Null);
        match json {
            Value::Bool(b) => Ok((b, None)),
            Value::Object(o) => Ok((
                o.get("allowed").and_then(Value::as_bool).unwrap_or(false),
                o.get("message").and_then(Value::as_str).map(str::to_string),
            )),
            _ => Err(format!(
                "{} gave no decision (expected {{allowed, message}} or a boolean)",
                self.query
            )),
        }
    }
}

/// What is being decided on (a template is decided as a resource).
pub use crate::catalog::Kind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Shown to the caller when refused, and recorded.
    pub reason: String,
    /// The 1-based rule that decided; `None` = the default.
    pub rule: Option<usize>,
    /// Refused by a `step_up` rule: the scopes to ask the user for (HTTP 403 insufficient_scope).
    pub step_up: Option<Vec<String>>,
    /// For audit: `rule N`, `rego`, `default`, or `uri` (a resource URI too ambiguous to decide on).
    pub decided_by: &'static str,
    /// Allowed by an `effect = "approve"` rule: the call goes on only once approved (lists show
    /// the item: it is callable, after approval).
    pub approval: Option<Arc<ApprovalRule>>,
}

impl Decision {
    /// What decided, for audit: `rule N`, `rego` or `default`.
    pub fn label(&self) -> String {
        match self.rule {
            Some(n) => format!("rule {n}"),
            None => self.decided_by.to_string(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<PolicyRule>,
    /// With inbound auth, what no rule allows is refused.
    default_deny: bool,
    /// Decides when no rule applies, and may veto what a rule allowed.
    rego: Option<RegoPolicy>,
}

impl Policy {
    pub fn new(rules: Vec<PolicyRule>, auth_enabled: bool) -> Self {
        Self {
            rules,
            default_deny: auth_enabled,
            rego: None,
        }
    }

    pub fn with_rego(mut self, rego: RegoPolicy) -> Self {
        self.rego = Some(rego);
        self
    }

    pub fn has_step_up(&self) -> bool {
        self.rules.iter().any(|r| r.step_up)
    }

    /// May `caller` see and use `name` (the upstream's own name or URI) of `kind` on `server`?
    pub fn decide(&self, caller: &Caller, server: &str, kind: Kind, name: &str) -> Decision {
        self.decide_call(caller, server, kind, name, None)
    }

    /// [`Self::decide`] for a call, with its arguments visible to a Rego policy.
    pub fn decide_call(
        &self,
        caller: &Caller,
        server: &str,
        kind: Kind,
        name: &str,
        arguments: Option<&Map<String, Value>>,
    ) -> Decision {
        // Resource rules see the URI in normal form; tools and prompts their names as they are.
        let uri = (kind == Kind::Resource).then(|| normalise_uri(name));
        if let Some(u) = &uri
            && u.ambiguous
            && self.reads_uris()
        {
            return Decision {
                allow: false,
                reason: format!(
                    "resource `{}` has `.` or `..` segments that readers resolve differently; refused",
                    clip(name)
                ),
                rule: None,
                step_up: None,
                approval: None,
                decided_by: "uri",
            };
        }
        let matched = uri.as_ref().map_or(name, |u| u.text.as_str());
        let by_rules = self.by_rules(caller, server, kind, name, matched);
        let Some(rego) = &self.rego else {
            return by_rules.unwrap_or_else(|| self.default(server, kind, name));
        };
        match by_rules {
            Some(d) if !d.allow => d,
            ruled => {
                let input = serde_json::json!({
                    "caller": {
                        "sub": caller.sub,
                        "client_id": caller.client_id,
                        "scopes": caller.scopes,
                        "groups": caller.groups,
                        "act": caller.act,
                        "claims": *caller.claims,
                        "authenticated": caller.authenticated,
                    },
                    "server": server,
                    "kind": kind.as_str(),
                    "name": name,
                    "uri": uri.as_ref().map(|u| u.text.as_str()),
                    "arguments": arguments,
                });
                match rego.eval(input) {
                    Ok((true, _)) => ruled.unwrap_or(Decision {
                        allow: true,
                        reason: "allowed by the Rego policy".into(),
                        rule: None,
                        step_up: None,
                        approval: None,
                        decided_by: "rego",
                    }),
                    Ok((false, message)) => Decision {
                        allow: false,
                        reason: message.unwrap_or_else(|| {
                            format!(
                                "{} `{}` is refused by the Rego policy",
                                kind.as_str(),
                                clip(name)
                            )
                        }),
                        rule: None,
                        step_up: None,
                        approval: None,
                        decided_by: "rego",
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "Rego policy failed; refusing");
                        Decision {
                            allow: false,
                            reason: "the access policy could not be evaluated".into(),
                            rule: None,
                            step_up: None,
                            approval: None,
                            decided_by: "rego",
                        }
                    }
                }
            }
        }
    }

    /// Does any decision depend on a resource's URI?
    fn reads_uris(&self) -> bool {
        self.rego.is_some() || self.rules.iter().any(|r| r.resources.is_some())
    }

    /// `name` is for messages, `matched` what the selectors match (a resource's normal form).
    fn by_rules(
        &self,
        caller: &Caller,
        server: &str,
        kind: Kind,
        name: &str,
        matched: &str,
    ) -> Option<Decision> {
        for r in &self.rules {
            if !applies(r, server, kind, matched) {
                continue;
            }
            let holds = conditions_hold(r, caller);
            match (r.effect, holds) {
                (Effect::Allow, true) => {
                    return Some(Decision {
                        allow: true,
                        reason: format!("allowed by policy rule {}", r.number),
                        rule: Some(r.number),
                        step_up: None,
                        approval: None,
                        decided_by: "rule",
                    });
                }
                (Effect::Approve, true) => {
                    return Some(Decision {
                        allow: true,
                        reason: format!("allowed by policy rule {} once approved", r.number),
                        rule: Some(r.number),
                        step_up: None,
                        approval: r.approval.clone(),
                        decided_by: "rule",
                    });
                }
                (Effect::Allow | Effect::Approve, false) | (Effect::Deny, true) => {
                    return Some(Decision {
                        allow: false,
                        reason: r
                            .message
                            .clone()
                            .unwrap_or_else(|| refusal(r, kind, name, caller)),
                        rule: Some(r.number),
                        step_up: (r.step_up && r.effect == Effect::Allow)
                            .then(|| r.require_scopes.clone()),
                        approval: None,
                        decided_by: "rule",
                    });
                }
                (Effect::Deny, false) => continue,
            }
        }
        None
    }

    fn default(&self, server: &str, kind: Kind, name: &str) -> Decision {
        // The name is the caller's: quoted clipped.
        let name = &*clip(name);
        if self.default_deny {
            Decision {
                allow: false,
                reason: format!(
                    "no policy rule allows {} `{name}` on server `{server}`",
                    kind.as_str()
                ),
                rule: None,
                step_up: None,
                approval: None,
                decided_by: "default",
            }
        } else {
            Decision {
                allow: true,
                reason: "allowed: no policy rule applies and inbound auth is off".into(),
                rule: None,
                step_up: None,
                approval: None,
                decided_by: "default",
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
        Kind::Resource | Kind::Template => &r.resources,
    };
    selector.as_ref().is_some_and(|g| g.matches(name))
}

fn conditions_hold(r: &PolicyRule, caller: &Caller) -> bool {
    r.require_scopes.iter().all(|s| caller.has_scope(s))
        && r.claims.iter().all(|(k, v)| caller.claim_matches(k, v))
}

fn refusal(r: &PolicyRule, kind: Kind, name: &str, caller: &Caller) -> String {
    // The name is the caller's: quoted clipped.
    let name = &*clip(name);
    let missing: Vec<&str> = r
        .require_scopes
        .iter()
        .filter(|s| !caller.has_scope(s))
        .map(String::as_str)
        .collect();
    if r.effect != Effect::Deny && !missing.is_empty() {
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
            token: None,
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
    fn rego_decides_after_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.rego");
        std::fs::write(
            &path,
            r#"package mcp.broker
import rego.v1

default decision := {"allowed": true}

decision := {"allowed": false, "message": "PII access requires the pii:read scope."} if {
    input.name == "get_customer_pii"
    not "pii:read" in input.caller.scopes
}

decision := {"allowed": false, "message": "Transfers over 1000 need approval."} if {
    input.name == "transfer"
    input.arguments.amount > 1000
}
"#,
        )
        .unwrap();
        let rego = RegoPolicy::load(&RegoConfig {
            path,
            query: "data.mcp.broker.decision".into(),
        })
        .unwrap();
        let p = policy(
            "[[policy]]\ntools = [\"delete_*\"]\neffect = \"deny\"\n",
            true,
        )
        .with_rego(rego);
        let bob = caller(&["mcp:tools"], &[]);
        let d = p.decide(&bob, "ledger", Kind::Tool, "get_customer_pii");
        assert_eq!(
            (d.allow, d.reason.as_str()),
            (false, "PII access requires the pii:read scope.")
        );
        assert!(
            p.decide(
                &caller(&["pii:read"], &[]),
                "ledger",
                Kind::Tool,
                "get_customer_pii"
            )
            .allow
        );
        assert!(
            !p.decide(&bob, "ledger", Kind::Tool, "delete_account").allow,
            "rules refuse first"
        );
        let big = serde_json::json!({"amount": 5000});
        let small = serde_json::json!({"amount": 10});
        assert!(
            !p.decide_call(&bob, "ledger", Kind::Tool, "transfer", big.as_object())
                .allow
        );
        assert!(
            p.decide_call(&bob, "ledger", Kind::Tool, "transfer", small.as_object())
                .allow
        );
    }

    #[test]
    fn rego_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.rego");
        std::fs::write(&path, "package mcp.broker\n\ndecision := {\n").unwrap();
        let e = RegoPolicy::load(&RegoConfig {
            path: path.clone(),
            query: "data.mcp.broker.decision".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.rego"), "{e}");
    }

    #[test]
    fn a_resource_deny_rule_refuses_every_spelling_of_its_uris() {
        let p = policy(
            "[[policy]]\neffect = \"deny\"\nresources = [\"ledger://secret/*\"]\n",
            false,
        );
        let anyone = Caller::anonymous();
        for uri in [
            "ledger://secret/x",
            "LEDGER://secret/x",
            "ledger://SECRET/x",
            "ledger://secret/%78",
            "ledger://secret/./x",
            "ledger://secret/a/%2E%2E/x",
        ] {
            let d = p.decide(&anyone, "ledger", Kind::Resource, uri);
            assert!(
                !d.allow && d.rule == Some(1),
                "{uri} slipped past the deny rule"
            );
        }
        // `public` is the host by RFC 3986 and a path segment to some upstreams: refused either way.
        for uri in [
            "ledger://public/../secret/x",
            "ledger://public/%2E%2E/secret/x",
        ] {
            let d = p.decide(&anyone, "ledger", Kind::Resource, uri);
            assert!(
                !d.allow && d.decided_by == "uri",
                "{uri} slipped past: {d:?}"
            );
        }
        // With no rule reading URIs, an ambiguous one is the upstream's business.
        let open = policy("[[policy]]\ntools = [\"x\"]\n", false);
        assert!(
            open.decide(
                &anyone,
                "ledger",
                Kind::Resource,
                "ledger://public/../secret/x"
            )
            .allow
        );
        for uri in [
            "ledger://public/x",
            "ledger://secret/a/b",
            "ledger://secret%2Fx",
        ] {
            assert!(
                p.decide(&anyone, "ledger", Kind::Resource, uri).allow,
                "{uri}"
            );
        }
    }

    #[test]
    fn a_star_stays_in_one_segment_and_two_stars_cross() {
        let p = policy(
            "[[policy]]\neffect = \"deny\"\nresources = [\"ledger://*\", \"files:///tmp/**\"]\n",
            false,
        );
        let anyone = Caller::anonymous();
        let refused = |uri: &str| !p.decide(&anyone, "s", Kind::Resource, uri).allow;
        assert!(refused("ledger://a"));
        assert!(!refused("ledger://a/b"), "`*` crossed `/`");
        assert!(refused("files:///tmp/a/b/c"));
        let p = policy(
            "[[policy]]\neffect = \"deny\"\nresources = [\"ledger://**\"]\n",
            false,
        );
        assert!(!p.decide(&anyone, "s", Kind::Resource, "ledger://a/b").allow);
        assert!(!p.decide(&anyone, "s", Kind::Resource, "ledger://a").allow);
        assert!(p.decide(&anyone, "s", Kind::Resource, "other://a/b").allow);
        assert!(!refused("files:///etc/passwd"));
        // A pattern is read in normal form too: an upper-case scheme in the rule still matches.
        let p = policy(
            "[[policy]]\neffect = \"deny\"\nresources = [\"LEDGER://Secret/**\"]\n",
            false,
        );
        assert!(
            !p.decide(&anyone, "s", Kind::Resource, "ledger://secret/a/b")
                .allow
        );
        // Tool names keep their globs: `*` matches any character.
        let p = policy("[[policy]]\neffect = \"deny\"\ntools = [\"a*\"]\n", false);
        assert!(!p.decide(&anyone, "s", Kind::Tool, "a/b").allow);
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

    #[test]
    fn an_approve_rule_allows_once_approved_and_still_checks_its_conditions() {
        let p = policy(
            "[[policy]]\ntools = [\"update_*\"]\nrequire_scopes = [\"ledger:write\"]\neffect = \"approve\"\napproval = \"caller\"\n[[policy]]\neffect = \"allow\"\n",
            true,
        );
        let d = p.decide(
            &caller(&["ledger:write"], &[]),
            "ledger",
            Kind::Tool,
            "update_account_status",
        );
        assert!(d.allow && d.rule == Some(1), "{d:?}");
        assert!(d.approval.is_some(), "{d:?}");
        let d = p.decide(
            &caller(&[], &[]),
            "ledger",
            Kind::Tool,
            "update_account_status",
        );
        assert!(
            !d.allow && d.reason.contains("requires the scope(s) ledger:write"),
            "{d:?}"
        );
        let d = p.decide(&caller(&[], &[]), "ledger", Kind::Tool, "list_accounts");
        assert!(d.allow && d.approval.is_none(), "{d:?}");
    }
}
