//! `GET /status` and `mcp-broker status`: what every server is doing and who is connected, for a
//! person (a table) or a script (JSON).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::Broker;
use crate::upstream::status::ServerStatus;

#[derive(Debug, Serialize)]
pub struct Report {
    /// Seconds since the broker started.
    pub uptime_s: u64,
    /// Configuration reloads applied since start (0: the file read at start).
    pub generation: u64,
    pub draining: bool,
    /// Under `[cluster]`: this instance, and whether Redis answers.
    pub cluster: Option<ClusterStatus>,
    pub sessions: SessionCount,
    /// Calls in flight through this broker, all servers.
    pub calls_in_flight: usize,
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub instance_id: String,
    pub redis_up: bool,
}

#[derive(Debug, Serialize)]
pub struct SessionCount {
    pub total: usize,
    /// By the protocol revision each session's client negotiated.
    pub by_protocol: BTreeMap<String, usize>,
}

impl Broker {
    pub fn status(&self) -> Report {
        let st = self.state();
        let mut by_protocol = BTreeMap::new();
        let sessions = self.sessions.all();
        for s in &sessions {
            let version = s
                .peer
                .peer_info()
                .map_or_else(|| "unknown".to_string(), |i| i.protocol_version.to_string());
            *by_protocol.entry(version).or_insert(0) += 1;
        }
        Report {
            uptime_s: self.started.elapsed().as_secs(),
            generation: self.generation.load(Ordering::Relaxed),
            draining: self.is_draining(),
            cluster: self.cluster.as_ref().map(|c| ClusterStatus {
                instance_id: c.config.instance_id.clone(),
                redis_up: c.is_up(),
            }),
            sessions: SessionCount {
                total: sessions.len(),
                by_protocol,
            },
            calls_in_flight: self.active_calls.load(Ordering::Relaxed),
            servers: st.upstreams.iter().map(|u| u.status()).collect(),
        }
    }
}
