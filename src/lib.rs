//! mcp-broker: one MCP endpoint in front of many MCP servers.
//!
//! # Layout
//! Requests flow down, results and events flow back up; a module uses only modules below it.
//!
//! | layer | module | what it does |
//! |---|---|---|
//! | 0 | [`config`] | `servers.toml` → validated [`config::Config`]; errors name file, line and key |
//! | 0 | [`telemetry`] | `[telemetry]`: the OTLP/HTTP span exporter, a request's span (carried by its audit record), W3C `traceparent` |
//! | 1 | [`import`] | `import`: a client's MCP config (Claude Desktop, Claude Code, Cursor, VS Code) → `servers.toml`, secrets as `${VAR}`; `init`'s starter file |
//! | 1 | [`upstream`] | supervised MCP client connections over stdio, legacy SSE and Streamable HTTP |
//! | 1 | [`catalog`] | pure: the namespaced, collision-checked view of every upstream's lists (raw JSON items); the one [`catalog::Kind`] |
//! | 1 | [`auth`] | the [`auth::Caller`] behind a request |
//! | 1 | [`cluster`] | `[cluster]`: the Redis connection, shared session records, instance-to-instance messages, global limits |
//! | 1 | [`metrics`] | Prometheus counters; fed plain values, it imports no other module |
//! | 1 | [`audit`] | decision records (JSONL sinks), written on drop; each record also feeds [`metrics`] |
//! | 1 | [`guard`] | pure: secret detectors, pinned definitions (`servers.lock`), description scanning |
//! | 2 | [`policy`] | pure: one decision for what is listed and what is called |
//! | 2 | [`limits`] | token-bucket rate limits and concurrency caps |
//! | 2 | [`oauth`] | upstream OAuth: discovery, consent and sign-in flows, ID-JAG, client credentials, the encrypted token store |
//! | 2 | [`credentials`] | the per-server upstream credential: RFC 8693 exchange, Vault, static |
//! | 2 | [`oauth`] | upstream OAuth: the per-user token store (memory, a sealed file, or Redis under `[cluster]`) |
//! | 3 | [`broker`] | transport-free core: one request pipeline, the session registry, the caller-scoped event router |
//! | 4 | [`front`] | the rmcp `ServerHandler` adapter, the axum HTTP front |
//! | 5 | [`pinning`] | `pin` and `check --pins`: connect, hash each upstream's own tool definitions, write or compare `servers.lock` |
//! | 5 | [`app`] | wiring and shutdown order; [`app::run`] serves on a given listener until a given future resolves |
//! | 6 | [`cli`] | parses arguments and calls [`app`] (or [`audit_query`], [`status_query`], [`tokens_query`], [`approvals_query`], [`import`]) with plain values |

pub mod app;
pub mod approvals_query;
pub mod audit;
pub mod audit_query;
pub mod auth;
pub mod broker;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod front;
pub mod guard;
pub mod import;
pub mod limits;
pub mod metrics;
pub mod oauth;
pub mod pinning;
pub mod policy;
pub mod status_query;
pub mod telemetry;
pub mod tokens_query;
pub mod upstream;

/// Lower-case hex of `bytes` (one allocation).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}
