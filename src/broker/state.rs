//! What a configuration reload replaces at once: servers, namespaces, policy, credentials, limits,
//! secret detectors.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::Namespace;
use crate::config::{Config, Isolation};
use crate::credentials::Credentials;
use crate::guard::mask::Masker;
use crate::guard::pins::Lock;
use crate::limits::Concurrency;
use crate::policy::{Policy, PolicyError, RegoPolicy};
use crate::upstream::Upstream;

use super::BrokerError;

/// Requests take a snapshot (`Arc`) and use it throughout, so a reload never changes the rules
/// under a request in flight.
pub(super) struct State {
    pub config: Arc<Config>,
    /// In config order.
    pub upstreams: Vec<Arc<Upstream>>,
    pub namespaces: Vec<Namespace>,
    pub policy: Policy,
    pub credentials: Arc<Credentials>,
    /// Per-server caps on calls in flight (`max_concurrent`).
    pub concurrency: HashMap<Arc<str>, Arc<Concurrency>>,
    /// `[guard] pins`, read afresh on every reload (`mcp-broker pin --accept` then SIGHUP).
    pub pins: Option<Arc<Lock>>,
    /// `[guard] mask_results`: the detectors results pass through (`None`: not masked). Here, so a
    /// reload that changes the patterns applies to the next request and never to one half done.
    pub masker: Option<Masker>,
}

impl State {
    /// The state for `config`; servers whose configuration is unchanged from `old` keep their
    /// [`Upstream`] (and so their connections, children and concurrency slots).
    pub fn build(
        config: Arc<Config>,
        old: Option<&State>,
        cluster: Option<&Arc<crate::cluster::Cluster>>,
    ) -> Result<Self, BrokerError> {
        let policy = build_policy(&config)?;
        let pins = match &config.guard.pins {
            Some(path) => Some(Arc::new(Lock::load(path)?)),
            None => None,
        };
        let credentials = match old {
            Some(o) if o.config.credentials_fingerprint == config.credentials_fingerprint => {
                o.credentials.clone()
            }
            _ => Arc::new(Credentials::with_cluster(&config, cluster)?),
        };
        // Upstream OAuth follows every configuration (its servers, clients and sign-in); what it
        // holds (tokens, authorizations in progress) outlives reloads.
        crate::oauth::engine()
            .configure(&config)
            .map_err(crate::credentials::CredentialError::OAuth)?;
        let mut upstreams = Vec::with_capacity(config.servers.len());
        let mut concurrency = HashMap::new();
        for s in &config.servers {
            // Connections per owner (caller or session) rather than one shared connection.
            let per_owner = s.isolation != Isolation::Shared;
            let kept = old.and_then(|o| {
                o.upstream(&s.name)
                    // A server that failed for good (a missing executable) is tried afresh.
                    .filter(|u| {
                        u.config.fingerprint == s.fingerprint
                            && u.per_caller == per_owner
                            && !u.failed()
                    })
                    .map(|u| (u.clone(), o.concurrency.get(&u.name).cloned()))
            });
            let (up, slots) = match kept {
                Some((u, slots)) => (u, slots),
                None => {
                    let up = Upstream::new(s.clone(), per_owner)?;
                    // A server replaced by a reload keeps its entries while the new one connects.
                    up.seed_listing(
                        old.and_then(|o| o.upstream(&s.name))
                            .and_then(|u| u.listing()),
                    );
                    (up, None)
                }
            };
            if let Some(max) = s.max_concurrent {
                let slots = slots.unwrap_or_else(|| Arc::new(Concurrency::new(max)));
                concurrency.insert(up.name.clone(), slots);
            }
            upstreams.push(up);
        }
        Ok(Self {
            namespaces: Namespace::from_config(&config),
            masker: Masker::from_config(&config.guard),
            config,
            upstreams,
            policy,
            credentials,
            concurrency,
            pins,
        })
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name.as_ref() == name)
    }
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// The rules plus, when configured, the Rego policy (loaded and checked here).
pub fn build_policy(config: &Config) -> Result<Policy, PolicyError> {
    let p = Policy::new(config.policy.clone(), config.auth.is_some());
    Ok(match &config.rego {
        Some(r) => p.with_rego(RegoPolicy::load(r)?),
        None => p,
    })
}
