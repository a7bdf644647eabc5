//! What the load generator talks to: the ledger directly, the broker in front of it (with more or
//! fewer layers on), or a peer gateway in front of it. Starting a target starts every process it
//! needs and waits until the workload's tool is callable; stopping it stops them all.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;

use crate::config::{self, Layers, Upstream};
use crate::idp::Idp;
use crate::mcp::{HttpSession, Session, StdioConn, ToolCall};
use crate::procs::{self, Paths, Proc};

/// The workload: a cheap, deterministic ledger read with a small result and no progress.
pub const TOOL: &str = "get_account";
pub const ACCOUNT: &str = "ACC-1001";
/// How long a target may take to become callable.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Between readiness polls of the broker: the start-up figure's resolution. A shorter interval
/// would make the broker serialise its growing catalog more often while it starts.
const READY_POLL: Duration = Duration::from_millis(10);

/// How the ledger is reached by whatever fronts it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Transport {
    Http,
    Stdio,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Stdio => "stdio",
        }
    }
}

/// What the load generator sends its calls to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Front {
    /// The ledger itself (over HTTP, or over stdio spoken by the bench).
    #[value(name = "direct")]
    Direct,
    /// The broker without `[auth]`.
    #[value(name = "broker")]
    Broker,
    /// The broker with `[auth]` (a JWT from the bench's JWKS) and `[[policy]]` rules.
    #[value(name = "broker+auth")]
    BrokerAuth,
    /// As broker+auth, and an RFC 8693 exchanged token (cached) for the upstream.
    #[value(name = "broker+auth+exchange")]
    BrokerAuthExchange,
    /// PyPI mcp-proxy 0.13.0 (stdio upstream only).
    #[value(name = "mcp-proxy")]
    McpProxy,
    /// npm supergateway 4.0.0, stateful Streamable HTTP (stdio upstream only).
    #[value(name = "supergateway")]
    Supergateway,
}

impl Front {
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Broker => "broker",
            Self::BrokerAuth => "broker+auth",
            Self::BrokerAuthExchange => "broker+auth+exchange",
            Self::McpProxy => "mcp-proxy",
            Self::Supergateway => "supergateway",
        }
    }

    pub fn layers(self) -> Option<Layers> {
        match self {
            Self::Broker => Some(Layers::Off),
            Self::BrokerAuth => Some(Layers::AuthPolicy),
            Self::BrokerAuthExchange => Some(Layers::AuthPolicyExchange),
            _ => None,
        }
    }

    pub fn is_peer(self) -> bool {
        matches!(self, Self::McpProxy | Self::Supergateway)
    }
}

/// What every target needs from the bench.
pub struct Env {
    pub paths: Paths,
    pub idp: Idp,
    /// The caller's token for authenticated brokers (one subject for every session).
    pub token: String,
}

impl Env {
    fn token_for(&self, layers: Layers) -> Option<&str> {
        layers.authenticates().then_some(self.token.as_str())
    }
}

enum Endpoint {
    Http { url: String, token: Option<String> },
    Stdio(Arc<StdioConn>),
}

pub struct Target {
    endpoint: Endpoint,
    pub call: ToolCall,
    /// The process the client talks to, whose CPU time the calls cost there.
    pub server_pid: u32,
    procs: Vec<Proc>,
}

impl Target {
    /// `n` sessions: one Streamable HTTP session each, or `n` users of the one stdio connection.
    pub async fn sessions(&self, n: usize) -> Result<Vec<Session>, String> {
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            sessions.push(match &self.endpoint {
                Endpoint::Http { url, token } => {
                    Session::Http(HttpSession::open(url, token.as_deref()).await?)
                }
                Endpoint::Stdio(conn) => Session::Stdio(conn.clone()),
            });
        }
        Ok(sessions)
    }

    pub async fn stop(self) {
        // Stop the front first, so it does not log its upstream going away.
        for proc in self.procs.into_iter().rev() {
            proc.stop().await;
        }
    }
}

/// Why a peer gateway cannot be measured, when it is not installed.
pub fn peer_missing(paths: &Paths, front: Front) -> Option<String> {
    let (bin, how) = match front {
        Front::McpProxy => (mcp_proxy_bin(&paths.peers), "pip install mcp-proxy==0.13.0"),
        Front::Supergateway => (
            supergateway_bin(&paths.peers),
            "npm install supergateway@4.0.0",
        ),
        _ => return None,
    };
    (!bin.exists()).then(|| {
        format!(
            "{} not installed ({} missing; scripts/bench.sh installs it with {how})",
            front.label(),
            bin.display()
        )
    })
}

fn mcp_proxy_bin(peers: &Path) -> std::path::PathBuf {
    peers.join("venv/bin/mcp-proxy")
}

fn supergateway_bin(peers: &Path) -> std::path::PathBuf {
    peers.join("node_modules/.bin/supergateway")
}

/// Start `front` in front of a ledger reached over `transport`; `tag` names logs and configs.
pub async fn start(
    env: &Env,
    front: Front,
    transport: Transport,
    tag: &str,
) -> Result<Target, String> {
    let plain = ToolCall::new(TOOL, json!({ "account_id": ACCOUNT }), ACCOUNT);
    match (front, transport) {
        (Front::Direct, Transport::Http) => {
            let (ledger, url) = procs::start_ledger_http(&env.paths, tag).await?;
            Ok(Target {
                server_pid: ledger.pid(),
                endpoint: Endpoint::Http { url, token: None },
                call: plain,
                procs: vec![ledger],
            })
        }
        (Front::Direct, Transport::Stdio) => {
            let mut ledger = procs::start_ledger_stdio(&env.paths, tag)?;
            let (stdin, stdout) = ledger.stdio()?;
            let conn = StdioConn::open(stdin, stdout).await?;
            Ok(Target {
                server_pid: ledger.pid(),
                endpoint: Endpoint::Stdio(conn),
                call: plain,
                procs: vec![ledger],
            })
        }
        (Front::McpProxy | Front::Supergateway, Transport::Stdio) => {
            start_peer(env, front, tag, plain).await
        }
        (Front::McpProxy | Front::Supergateway, Transport::Http) => Err(format!(
            "{} is measured in front of a stdio upstream only",
            front.label()
        )),
        (broker, _) => {
            let layers = broker.layers().expect("every other front is a broker");
            start_broker_front(env, layers, transport, tag).await
        }
    }
}

async fn start_broker_front(
    env: &Env,
    layers: Layers,
    transport: Transport,
    tag: &str,
) -> Result<Target, String> {
    let mut procs = Vec::new();
    let upstream = match transport {
        Transport::Http => {
            let (ledger, url) =
                procs::start_ledger_http(&env.paths, &format!("{tag}-ledger")).await?;
            procs.push(ledger);
            Upstream::Http { url }
        }
        Transport::Stdio => Upstream::Stdio {
            ledger: env.paths.ledger.clone(),
        },
    };
    let servers = vec![("ledger".to_owned(), upstream)];
    let toml = config::render(layers, &servers, &env.idp);
    let path = config::write(&env.paths.out_dir, tag, &toml)?;
    let (broker, url) = procs::start_broker(&env.paths, tag, &path).await?;
    let token = env.token_for(layers).map(str::to_owned);
    let server_pid = broker.pid();
    procs.push(broker);
    wait_listed(&url, token.as_deref(), &["ledger".to_owned()]).await?;
    Ok(Target {
        endpoint: Endpoint::Http { url, token },
        call: ToolCall::new(
            &format!("ledger__{TOOL}"),
            json!({ "account_id": ACCOUNT }),
            ACCOUNT,
        ),
        server_pid,
        procs,
    })
}

async fn start_peer(env: &Env, front: Front, tag: &str, call: ToolCall) -> Result<Target, String> {
    let port = procs::free_port()?;
    let ledger = env.paths.ledger.display().to_string();
    let cmd = match front {
        Front::McpProxy => {
            let mut cmd = Command::new(mcp_proxy_bin(&env.paths.peers));
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--log-level", "WARNING", "-e", "RUST_LOG", "warn", "--"])
                .args([ledger.as_str(), "stdio"]);
            cmd
        }
        _ => {
            let mut cmd = Command::new(supergateway_bin(&env.paths.peers));
            cmd.args(["--stdio", &format!("{ledger} stdio")])
                .args(["--outputTransport", "streamableHttp", "--stateful"])
                .args(["--port", &port.to_string(), "--logLevel", "none"])
                .env("RUST_LOG", "warn");
            cmd
        }
    };
    let proc = Proc::spawn(tag, cmd, &env.paths.log(tag))?;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let target = Target {
        endpoint: Endpoint::Http { url, token: None },
        call,
        server_pid: proc.pid(),
        procs: vec![proc],
    };
    wait_callable(&target).await?;
    Ok(target)
}

/// Poll until one session can be opened and the workload's call succeeds (peers print nothing
/// reliable when they are ready).
async fn wait_callable(target: &Target) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let attempt = async {
            let mut sessions = target.sessions(1).await?;
            let mut session = sessions.pop().ok_or("no session")?;
            let result = session.call_tool(&target.call).await;
            session.close().await;
            result
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > READY_TIMEOUT => {
                return Err(format!("not callable within {READY_TIMEOUT:?}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Poll `tools/list` on the broker at `url` until every server in `servers` lists the workload's
/// tool: the broker connects to upstreams after it starts listening.
pub async fn wait_listed(url: &str, token: Option<&str>, servers: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let wanted: Vec<String> = servers.iter().map(|s| format!("{s}__{TOOL}")).collect();
    let mut session: Option<Session> = None;
    let mut last = String::from("no answer yet");
    while started.elapsed() < READY_TIMEOUT {
        if session.is_none() {
            match HttpSession::open(url, token).await {
                Ok(s) => session = Some(Session::Http(s)),
                Err(e) => last = e,
            }
        }
        if let Some(s) = session.as_mut() {
            match s.list_tools().await {
                Ok(names) if wanted.iter().all(|w| names.contains(w)) => {
                    if let Some(s) = session.take() {
                        s.close().await;
                    }
                    return Ok(());
                }
                Ok(names) => {
                    last = format!(
                        "{} of {} upstreams listed",
                        listed(&names, &wanted),
                        wanted.len()
                    )
                }
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
    Err(format!(
        "the broker at {url} was not ready within {READY_TIMEOUT:?}: {last}"
    ))
}

fn listed(names: &[String], wanted: &[String]) -> usize {
    wanted.iter().filter(|w| names.contains(w)).count()
}
