//! The one decision that both filters lists and admits calls, so a caller is never shown a tool it
//! cannot call nor refused one it was shown. Pure and synchronous. Rules arrive with the identity issue;
//! until then every caller may see and use everything the catalog exposes.

use crate::auth::Caller;

/// What is being decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Prompt,
    Resource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Shown to the caller when refused, and recorded.
    pub reason: String,
}

/// May `caller` see and use `name` (the upstream's own name or URI) of `kind` on `server`?
pub fn decide(_caller: &Caller, _server: &str, _kind: Kind, _name: &str) -> Decision {
    Decision {
        allow: true,
        reason: "no policy configured".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_rules_everything_is_allowed() {
        let d = decide(&Caller::anonymous(), "ledger", Kind::Tool, "list_accounts");
        assert!(d.allow);
    }
}
