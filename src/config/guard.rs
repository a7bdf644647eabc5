//! `[guard]`: guardrails on what flows through the broker — secrets masked in results, tool
//! definitions pinned against change, descriptions scanned for injected instructions, and where
//! approval requests are announced. Read by `crate::guard` and the broker's pipeline.

use std::path::PathBuf;

use super::raw::RawGuard;
use super::{ConfigError, Ctx};

/// What happens to a tool whose definition no longer matches its pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDrift {
    /// Hidden from lists and refused on call (the default).
    #[default]
    Hide,
    /// Still listed and callable; audited and counted.
    Flag,
}

/// What happens to a tool whose description looks like injected instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Logged and counted only.
    Warn,
    /// Listed; the finding audited and counted when first seen.
    Flag,
    /// Hidden from lists and refused on call.
    Hide,
}

/// A configured secret detector: matches become `[masked:<kind>]`.
#[derive(Debug, Clone)]
pub struct MaskPattern {
    pub kind: String,
    pub regex: regex::Regex,
}

#[derive(Debug, Clone, Default)]
pub struct GuardConfig {
    /// Run the secret detectors over tool results, prompt messages and resource contents.
    pub mask_results: bool,
    /// Configured detectors, after the built-in ones.
    pub mask_patterns: Vec<MaskPattern>,
    /// The lock file of pinned tool definitions (`mcp-broker pin` writes it); resolved against the
    /// config file's folder. `None`: definitions are not checked.
    pub pins: Option<PathBuf>,
    pub on_drift: OnDrift,
    /// `None`: descriptions are not scanned.
    pub scan_descriptions: Option<Scan>,
    /// Where approval requests for `approval = "approver"` rules are posted (with a signed link).
    pub approval_webhook: Option<url::Url>,
}

impl Ctx<'_> {
    pub(super) fn guard(
        &self,
        raw: Option<RawGuard>,
        base: &std::path::Path,
    ) -> Result<GuardConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(GuardConfig::default());
        };
        let t = &["guard"];
        let mut out = GuardConfig {
            mask_results: raw.mask_results.unwrap_or(false),
            ..GuardConfig::default()
        };
        for (i, p) in raw.mask_patterns.into_iter().enumerate() {
            let kind_ok = !p.kind.is_empty()
                && p.kind.len() <= 32
                && p.kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !kind_ok {
                return Err(self.invalid(
                    t,
                    "mask_patterns",
                    format!("pattern {}: `kind` must be 1-32 of A-Z a-z 0-9 _ -", i + 1),
                ));
            }
            let regex = regex::RegexBuilder::new(&p.regex)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    self.invalid(
                        t,
                        "mask_patterns",
                        format!("pattern {} (`{}`): {e}", i + 1, p.kind),
                    )
                })?;
            if regex.is_match("") {
                return Err(self.invalid(
                    t,
                    "mask_patterns",
                    format!("pattern {} (`{}`) matches the empty string", i + 1, p.kind),
                ));
            }
            out.mask_patterns.push(MaskPattern {
                kind: p.kind,
                regex,
            });
        }
        if let Some(p) = raw.pins {
            out.pins = Some(base.join(self.expand(t, "pins", &p)?));
        }
        out.on_drift = match raw.on_drift.as_deref() {
            None | Some("hide") => OnDrift::Hide,
            Some("flag") => OnDrift::Flag,
            Some(o) => {
                return Err(self.invalid(
                    t,
                    "on_drift",
                    format!("\"{o}\": use \"hide\" or \"flag\""),
                ));
            }
        };
        out.scan_descriptions = match raw.scan_descriptions.as_deref() {
            None | Some("off") => None,
            Some("warn") => Some(Scan::Warn),
            Some("flag") => Some(Scan::Flag),
            Some("hide") => Some(Scan::Hide),
            Some(o) => {
                return Err(self.invalid(
                    t,
                    "scan_descriptions",
                    format!("\"{o}\": use \"warn\", \"flag\" or \"hide\""),
                ));
            }
        };
        if let Some(w) = raw.approval_webhook {
            let w = self.expand(t, "approval_webhook", &w)?;
            let url = url::Url::parse(&w)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            out.approval_webhook = Some(url.ok_or_else(|| {
                self.invalid(t, "approval_webhook", "must be an http or https URL".into())
            })?);
        }
        Ok(out)
    }
}
