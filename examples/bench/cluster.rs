//! Suite 5: `[cluster]` (issue 14). What sharing state in Redis costs per call, and calls/s
//! through HAProxy in front of one and of three instances.
//!
//! One `redis-server` (a free port, no persistence, its own process group) serves every cell; the
//! upstream is the ledger over stdio, started by each instance; no `[auth]` (so what is measured
//! is the cluster's cost), the direct lane on (the default); the workload, the load generator and
//! the durations are those of the tools/call cells ([`crate::calls`]). Setups, each measured at
//! every concurrency level:
//!
//! - `broker`: one instance without `[cluster]`, reached directly: the baseline;
//! - `broker+cluster`: one instance with `[cluster]`, reached directly: the difference with
//!   `broker` is what the cluster's Redis lookups cost per call;
//! - `broker+cluster+limits`: as `broker+cluster` with a per-server `rate_limit` too high to ever
//!   refuse and `max_concurrent = 1000`, so every call runs the token bucket's Lua script and takes
//!   and releases a concurrency lease in Redis;
//! - `haproxy→1`, `haproxy→3`: `examples/cluster/haproxy.cfg` as documented (round robin,
//!   `option http-server-close`), only its addresses replaced and unused `server` lines removed,
//!   in front of one and of three `[cluster]` instances;
//! - `haproxy→3 keep-alive`: the same file without `option http-server-close` (HAProxy's default:
//!   idle connections to the instances are reused), to show what that line costs.
//!
//! Redis commands per call are read from `INFO commandstats` before and after the measured calls,
//! less the heartbeats (one `SET` per instance per second) and the bench's own `INFO`. Sessions are
//! opened (and behind HAProxy restored on each instance) during the warm-up, so the figure is the
//! steady state of a session's calls. Skipped, with a note, when `redis-server` or `haproxy` is not
//! on `PATH`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::process::Command;

use crate::calls::{self, Measure, Settings};
use crate::config;
use crate::load::{self, Stats, Stop};
use crate::mcp::{self, HttpSession, Session, ToolCall};
use crate::procs::{self, Paths, Proc};
use crate::targets::{self, ACCOUNT, Env, TOOL};

/// The balancer configuration the README documents; rendered with this run's addresses.
const HAPROXY_EXAMPLE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/cluster/haproxy.cfg"
));
/// `[cluster] secret_key` must come from the environment; the bench's instances only need to share
/// one.
const CLUSTER_KEY_VAR: &str = "MCP_BROKER_CLUSTER_KEY";
const CLUSTER_KEY: &str = "mcp-broker-bench-cluster-key-not-a-secret-0123456789";
/// How long Redis may take to answer PING, and HAProxy to see every instance up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Each instance's heartbeat: one `SET` a second (`src/cluster/mod.rs`).
const HEARTBEATS_PER_SECOND: f64 = 1.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Balancer {
    /// The client talks to the one instance.
    None,
    /// `examples/cluster/haproxy.cfg` as documented.
    ServerClose,
    /// The same without `option http-server-close`.
    KeepAlive,
}

impl Balancer {
    fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ServerClose => "haproxy, option http-server-close",
            Self::KeepAlive => "haproxy, keep-alive",
        }
    }
}

struct Setup {
    label: &'static str,
    instances: usize,
    cluster: bool,
    limits: bool,
    balancer: Balancer,
}

const SETUPS: &[Setup] = &[
    Setup {
        label: "broker",
        instances: 1,
        cluster: false,
        limits: false,
        balancer: Balancer::None,
    },
    Setup {
        label: "broker+cluster",
        instances: 1,
        cluster: true,
        limits: false,
        balancer: Balancer::None,
    },
    Setup {
        label: "broker+cluster+limits",
        instances: 1,
        cluster: true,
        limits: true,
        balancer: Balancer::None,
    },
    Setup {
        label: "haproxy→1",
        instances: 1,
        cluster: true,
        limits: false,
        balancer: Balancer::ServerClose,
    },
    Setup {
        label: "haproxy→3",
        instances: 3,
        cluster: true,
        limits: false,
        balancer: Balancer::ServerClose,
    },
    Setup {
        label: "haproxy→3 keep-alive",
        instances: 3,
        cluster: true,
        limits: false,
        balancer: Balancer::KeepAlive,
    },
];

/// The label of the baseline setup the others are compared with.
pub const BASELINE: &str = "broker";

/// What the suite produced.
#[derive(Serialize)]
pub struct ClusterRun {
    pub redis_version: Option<String>,
    pub haproxy_version: Option<String>,
    pub cells: Vec<Cell>,
}

/// One (setup, concurrency) measurement.
#[derive(Clone, Serialize)]
pub struct Cell {
    pub setup: &'static str,
    pub instances: usize,
    pub cluster: bool,
    pub limits: bool,
    pub balancer: &'static str,
    pub concurrency: usize,
    #[serde(flatten)]
    pub stats: Stats,
    /// utime + stime per successful call of the broker processes, summed over the instances
    /// (their ledger children not included).
    pub broker_cpu_us_per_call: Option<f64>,
    pub redis_cpu_us_per_call: Option<f64>,
    pub haproxy_cpu_us_per_call: Option<f64>,
    /// The load generator (this process).
    pub client_cpu_us_per_call: Option<f64>,
    /// Commands Redis processed per successful call, heartbeats and the bench's `INFO` left out.
    pub redis_commands_per_call: Option<f64>,
    /// The same by command (`INFO commandstats` names), those with any.
    pub redis_commands: BTreeMap<String, f64>,
}

/// Run every setup at every concurrency; `None` (with a note) when Redis or HAProxy is missing.
pub async fn run(env: &Env, settings: &Settings, notes: &mut Vec<String>) -> Option<ClusterRun> {
    let redis_bin = on_path("redis-server");
    let haproxy_bin = on_path("haproxy");
    let (Some(redis_bin), Some(haproxy_bin)) = (redis_bin.clone(), haproxy_bin.clone()) else {
        let missing: Vec<&str> = [("redis-server", &redis_bin), ("haproxy", &haproxy_bin)]
            .iter()
            .filter(|(_, found)| found.is_none())
            .map(|(name, _)| *name)
            .collect();
        calls::note(
            notes,
            format!(
                "skipped the [cluster] cells: {} not on PATH",
                missing.join(" and ")
            ),
        );
        return None;
    };
    eprintln!("== [cluster]: starting redis-server");
    let redis = match Redis::start(&env.paths, &redis_bin).await {
        Ok(r) => r,
        Err(e) => {
            calls::note(notes, format!("[cluster] cells: {e}"));
            return None;
        }
    };
    let mut cells = Vec::new();
    for setup in SETUPS {
        eprintln!(
            "== [cluster] tools/call: {} (ledger over stdio)",
            setup.label
        );
        let fleet = match Fleet::start(env, setup, &redis, &haproxy_bin).await {
            Ok(f) => f,
            Err(e) => {
                calls::note(
                    notes,
                    format!("[cluster] {} did not start: {e}", setup.label),
                );
                continue;
            }
        };
        for &concurrency in &settings.concurrency {
            match measure(&fleet, &redis, setup, concurrency, settings).await {
                Ok(cell) => {
                    progress(&cell);
                    cells.push(cell);
                }
                Err(e) => calls::note(
                    notes,
                    format!(
                        "[cluster] {} at concurrency {concurrency}: {e}",
                        setup.label
                    ),
                ),
            }
        }
        fleet.stop().await;
    }
    redis.proc.stop().await;
    Some(ClusterRun {
        redis_version: version_word(&redis_bin, "--version", "v="),
        haproxy_version: version_word(&haproxy_bin, "-v", "version "),
        cells,
    })
}

/// `name` in a `PATH` folder.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The word after `marker` in what `bin flag` prints (`v=7.0.15`, `version 2.6.12`).
fn version_word(bin: &Path, flag: &str, marker: &str) -> Option<String> {
    let out = std::process::Command::new(bin).arg(flag).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, rest) = text.split_once(marker)?;
    rest.split_whitespace().next().map(str::to_owned)
}

/// The one `redis-server` of the suite, and the bench's own connection to it (for `INFO`).
struct Redis {
    proc: Proc,
    url: String,
    conn: redis::aio::MultiplexedConnection,
}

impl Redis {
    async fn start(paths: &Paths, bin: &Path) -> Result<Self, String> {
        let port = procs::free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        let mut proc = Proc::spawn_logged("redis", cmd, &paths.log("redis"))?;
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).map_err(|e| format!("redis client: {e}"))?;
        let started = Instant::now();
        loop {
            if proc.exited() {
                return Err("redis-server exited at once (see target/bench/logs/redis.log)".into());
            }
            let attempt = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>((conn, pong))
            };
            match attempt.await {
                Ok((conn, pong)) if pong == "PONG" => return Ok(Self { proc, url, conn }),
                Ok((_, other)) => return Err(format!("redis-server answered PING with {other:?}")),
                Err(e) if started.elapsed() > START_TIMEOUT => {
                    return Err(format!(
                        "redis-server on port {port} did not answer within {START_TIMEOUT:?}: {e}"
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Calls so far by command, from `INFO commandstats`.
    async fn commandstats(&self) -> Result<BTreeMap<String, u64>, String> {
        let mut conn = self.conn.clone();
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("INFO commandstats: {e}"))?;
        Ok(parse_commandstats(&text))
    }
}

/// `cmdstat_get:calls=12,usec=…` lines → `get` → 12.
fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The processes of one setup and the URL the load generator calls.
struct Fleet {
    url: String,
    brokers: Vec<Proc>,
    haproxy: Option<Proc>,
    /// Instances writing a heartbeat to Redis.
    heartbeats: usize,
}

impl Fleet {
    async fn start(
        env: &Env,
        setup: &Setup,
        redis: &Redis,
        haproxy_bin: &Path,
    ) -> Result<Self, String> {
        let slug: String = setup
            .label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        // HAProxy's ports first: its URL is every instance's `public_url`.
        let balancer_ports = match setup.balancer {
            Balancer::None => None,
            _ => Some((procs::free_port()?, procs::free_port()?)),
        };
        let public = balancer_ports.map(|(port, _)| format!("http://127.0.0.1:{port}/mcp"));
        let mut brokers = Vec::new();
        let mut urls = Vec::new();
        for i in 1..=setup.instances {
            let tag = format!("cluster-{slug}-b{i}");
            let toml = broker_config(
                &env.paths.ledger,
                setup,
                &redis.url,
                public.as_deref(),
                &format!("bench-b{i}"),
            );
            let path = config::write(&env.paths.out_dir, &tag, &toml)?;
            let (proc, url) = procs::start_broker_with_env(
                &env.paths,
                &tag,
                &path,
                &[(CLUSTER_KEY_VAR, CLUSTER_KEY)],
            )
            .await?;
            brokers.push(proc);
            urls.push(url);
        }
        // Each instance directly: its upstream is connected (through HAProxy a session's
        // requests would spread over the instances).
        for url in &urls {
            targets::wait_listed(url, None, &["ledger".to_owned()]).await?;
        }
        let mut fleet = Self {
            url: urls.first().cloned().ok_or("no instance")?,
            brokers,
            haproxy: None,
            heartbeats: if setup.cluster { setup.instances } else { 0 },
        };
        if let (Some((port, stats)), Some(public)) = (balancer_ports, public) {
            let backends = urls
                .iter()
                .map(|u| port_of(u))
                .collect::<Result<Vec<u16>, String>>()?;
            let cfg = haproxy_config(port, stats, &backends, setup.balancer)?;
            let tag = format!("cluster-{slug}-haproxy");
            let path = env.paths.out_dir.join(format!("{tag}.cfg"));
            std::fs::write(&path, cfg)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let check = Command::new(haproxy_bin)
                .arg("-c")
                .arg("-q")
                .arg("-f")
                .arg(&path)
                .output()
                .await
                .map_err(|e| format!("cannot run haproxy -c: {e}"))?;
            if !check.status.success() {
                return Err(format!(
                    "haproxy -c refused {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&check.stderr).trim()
                ));
            }
            let mut cmd = Command::new(haproxy_bin);
            cmd.arg("-f").arg(&path).arg("-db");
            let proc = Proc::spawn_logged(&tag, cmd, &env.paths.log(&tag))?;
            let haproxy = fleet.haproxy.insert(proc);
            wait_up(haproxy, stats, setup.instances).await?;
            targets::wait_listed(&public, None, &["ledger".to_owned()]).await?;
            fleet.url = public;
        }
        Ok(fleet)
    }

    /// CPU time of the broker instances together.
    fn brokers_cpu(&self) -> Option<Duration> {
        self.brokers.iter().map(|p| procs::cpu_time(p.pid())).sum()
    }

    async fn stop(self) {
        // The balancer first, so it does not log the instances going away.
        if let Some(h) = self.haproxy {
            h.stop().await;
        }
        for proc in self.brokers {
            proc.stop().await;
        }
    }
}

fn port_of(url: &str) -> Result<u16, String> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .ok_or_else(|| format!("no port in the broker's URL {url}"))
}

/// One instance's configuration: the ledger over stdio; `[cluster]`, limits and `public_url` as
/// the setup says.
fn broker_config(
    ledger: &Path,
    setup: &Setup,
    redis_url: &str,
    public_url: Option<&str>,
    instance_id: &str,
) -> String {
    let mut toml = String::from(
        "# Written by examples/bench/cluster.rs.\n\
         [broker]\n\
         listen = \"127.0.0.1:0\"\n\
         session_idle_timeout = \"10m\"\n",
    );
    if let Some(url) = public_url {
        toml.push_str(&format!("public_url = {}\n", config::quote(url)));
    }
    if setup.cluster {
        toml.push_str(&format!(
            "\n[cluster]\n\
             redis_url = {}\n\
             instance_id = {}\n\
             secret_key = \"${{{CLUSTER_KEY_VAR}}}\"\n",
            config::quote(redis_url),
            config::quote(instance_id)
        ));
    }
    toml.push_str(&format!(
        "\n[servers.ledger]\n\
         transport = \"stdio\"\n\
         command = {}\n\
         args = [\"stdio\"]\n\
         env = {{ RUST_LOG = \"warn\" }}\n",
        config::quote(&ledger.display().to_string())
    ));
    if setup.limits {
        // Never refuses at these rates: every call pays for the checks, none is turned away.
        toml.push_str(
            "rate_limit = { rate = \"1000000/s\" }\n\
             max_concurrent = 1000\n",
        );
    }
    toml
}

/// `examples/cluster/haproxy.cfg` with this run's addresses, line by line like
/// `tests/e2e/clusterlib.py`: each replaced line must occur exactly once, so a change to the
/// example fails here rather than measuring something else.
fn haproxy_config(
    port: u16,
    stats: u16,
    backends: &[u16],
    balancer: Balancer,
) -> Result<String, String> {
    let mut text = HAPROXY_EXAMPLE.to_owned();
    let mut edits: Vec<(String, Option<String>)> = vec![
        (
            "    bind :8080".into(),
            Some(format!("    bind 127.0.0.1:{port}")),
        ),
        (
            "    bind 127.0.0.1:8404".into(),
            Some(format!("    bind 127.0.0.1:{stats}")),
        ),
    ];
    for i in 1..=3 {
        let line = format!("    server b{i} broker-{i}:8080 check");
        let with = backends
            .get(i - 1)
            .map(|p| format!("    server b{i} 127.0.0.1:{p} check"));
        edits.push((line, with));
    }
    if backends.len() > 3 {
        return Err("the example has three server lines".into());
    }
    if balancer == Balancer::KeepAlive {
        edits.push(("    option http-server-close".into(), None));
    }
    for (line, with) in edits {
        text = replace_line(&text, &line, with.as_deref())?;
    }
    Ok(text)
}

/// `text` with its one line equal to `line` replaced by `with` (or removed).
fn replace_line(text: &str, line: &str, with: Option<&str>) -> Result<String, String> {
    let found = text.lines().filter(|l| *l == line).count();
    if found != 1 {
        return Err(format!(
            "examples/cluster/haproxy.cfg: {line:?} occurs {found} times, expected once (did the example change?)"
        ));
    }
    let mut out = String::with_capacity(text.len());
    for l in text.lines() {
        match (l == line, with) {
            (false, _) => out.push_str(l),
            (true, Some(w)) => out.push_str(w),
            (true, None) => continue,
        }
        out.push('\n');
    }
    Ok(out)
}

/// Poll HAProxy's stats CSV until the backend's `b1`..`bN` are all `UP`.
async fn wait_up(haproxy: &mut Proc, stats: u16, instances: usize) -> Result<(), String> {
    let http = mcp::http_client()?;
    let url = format!("http://127.0.0.1:{stats}/stats;csv");
    let wanted: Vec<String> = (1..=instances).map(|i| format!("b{i}")).collect();
    let started = Instant::now();
    loop {
        if haproxy.exited() {
            return Err("haproxy exited (see its log in target/bench/logs/)".into());
        }
        let seen = match http.get(&url).send().await {
            Ok(r) => match r.text().await {
                Ok(csv) => {
                    let up = servers_up(&csv);
                    if wanted.iter().all(|w| up.contains(w)) {
                        return Ok(());
                    }
                    format!("up: {up:?}")
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if started.elapsed() > START_TIMEOUT {
            return Err(format!(
                "haproxy did not see {wanted:?} up within {START_TIMEOUT:?} ({seen})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `brokers` backend's servers whose status is `UP`, from the stats CSV.
fn servers_up(csv: &str) -> Vec<String> {
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(status)) = (col("pxname"), col("svname"), col("status")) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|row| row.get(px) == Some(&"brokers") && row.get(status) == Some(&"UP"))
        .filter_map(|row| row.get(sv).map(|s| s.to_string()))
        .collect()
}

/// What is read before and after the measured calls.
struct Snapshot {
    at: Instant,
    brokers: Option<Duration>,
    redis: Option<Duration>,
    haproxy: Option<Duration>,
    me: Option<Duration>,
    commands: BTreeMap<String, u64>,
}

impl Snapshot {
    async fn take(fleet: &Fleet, redis: &Redis) -> Result<Self, String> {
        let commands = redis.commandstats().await?;
        Ok(Self {
            at: Instant::now(),
            brokers: fleet.brokers_cpu(),
            redis: procs::cpu_time(redis.proc.pid()),
            haproxy: fleet
                .haproxy
                .as_ref()
                .and_then(|h| procs::cpu_time(h.pid())),
            me: procs::cpu_time(std::process::id()),
            commands,
        })
    }
}

/// Open `concurrency` sessions, warm up, measure; as the tools/call cells, a timed cell runs on
/// until it has made `cpu_calls` calls.
async fn measure(
    fleet: &Fleet,
    redis: &Redis,
    setup: &Setup,
    concurrency: usize,
    settings: &Settings,
) -> Result<Cell, String> {
    let call = ToolCall::new(
        &format!("ledger__{TOOL}"),
        json!({ "account_id": ACCOUNT }),
        ACCOUNT,
    );
    let mut sessions = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        sessions.push(Session::Http(HttpSession::open(&fleet.url, None).await?));
    }
    if !settings.warmup.is_zero() {
        sessions = load::phase(sessions, &call, Stop::after(settings.warmup))
            .await
            .0;
    }
    let before = Snapshot::take(fleet, redis).await?;
    let stop = match settings.measure {
        Measure::Seconds(s) => Stop::after_at_least(Duration::from_secs_f64(s), settings.cpu_calls),
        Measure::Calls(n) => Stop::calls(n),
    };
    let (sessions, sample) = load::phase(sessions, &call, stop).await;
    let after = Snapshot::take(fleet, redis).await?;
    for session in sessions {
        session.close().await;
    }
    let stats = sample.stats();
    let calls = stats.calls;
    let per_call = |b: Option<Duration>, a: Option<Duration>| match (b, a) {
        (Some(b), Some(a)) if calls > 0 => {
            Some(a.saturating_sub(b).as_secs_f64() * 1e6 / calls as f64)
        }
        _ => None,
    };
    let mut deltas: BTreeMap<String, u64> = after
        .commands
        .iter()
        .map(|(name, n)| {
            let was = before.commands.get(name).copied().unwrap_or(0);
            (name.clone(), n.saturating_sub(was))
        })
        .collect();
    // The bench's own INFO, and the heartbeats the instances write whether or not calls run.
    deltas.remove("info");
    let heartbeats = (after.at.duration_since(before.at).as_secs_f64()
        * HEARTBEATS_PER_SECOND
        * fleet.heartbeats as f64)
        .round() as u64;
    if let Some(set) = deltas.get_mut("set") {
        *set = set.saturating_sub(heartbeats);
    }
    deltas.retain(|_, n| *n > 0);
    let (redis_commands_per_call, redis_commands) = if calls > 0 {
        let by_name: BTreeMap<String, f64> = deltas
            .into_iter()
            .map(|(name, n)| (name, n as f64 / calls as f64))
            .collect();
        // A fold from +0.0: an empty float sum is -0.0.
        (Some(by_name.values().fold(0.0, |a, b| a + b)), by_name)
    } else {
        (None, BTreeMap::new())
    };
    Ok(Cell {
        setup: setup.label,
        instances: setup.instances,
        cluster: setup.cluster,
        limits: setup.limits,
        balancer: setup.balancer.label(),
        concurrency,
        broker_cpu_us_per_call: per_call(before.brokers, after.brokers),
        redis_cpu_us_per_call: per_call(before.redis, after.redis),
        haproxy_cpu_us_per_call: per_call(before.haproxy, after.haproxy),
        client_cpu_us_per_call: per_call(before.me, after.me),
        redis_commands_per_call,
        redis_commands,
        stats,
    })
}

fn progress(cell: &Cell) {
    let s = &cell.stats;
    let errors = match &s.first_error {
        Some(e) => format!(", {} errors (first: {e})", s.errors),
        None => String::new(),
    };
    eprintln!(
        "   c={:<3} {:>8.0} calls/s  p50 {:.3} ms  p99 {:.3} ms  redis {} cmd/call{errors}",
        cell.concurrency,
        s.rps,
        s.p50_ms,
        s.p99_ms,
        cell.redis_commands_per_call
            .map_or("?".into(), |n| format!("{n:.2}"))
    );
}
