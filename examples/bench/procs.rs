//! Child processes the bench starts (ledger, broker, peer gateways) and what it reads about them
//! from `/proc`.
//!
//! Each child runs in a process group of its own, with stderr appended to a log file. [`Proc::stop`]
//! sends SIGTERM to the group and waits; dropping a [`Proc`] that was not stopped (an error, a
//! panic, ctrl-c) sends SIGKILL to the group, so nothing is left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long a child may take to print its "listening" line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Proc {
    name: String,
    child: Child,
    pid: u32,
    /// Set once the child has been waited for, so `Drop` has nothing left to do.
    reaped: bool,
}

impl Proc {
    /// Spawn `cmd` with piped stdin/stdout, stderr to `log`, in a new process group.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        Self::spawn_with(name, cmd, log)
    }

    /// Spawn a server the bench does not speak to over stdio (Redis, HAProxy): stdin closed,
    /// stdout and stderr both appended to `log` (HAProxy logs every request to stdout, which a
    /// pipe nobody reads would stall), in a new process group.
    pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::from(open_log(log)?));
        Self::spawn_with(name, cmd, log)
    }

    fn spawn_with(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        cmd.stderr(Stdio::from(open_log(log)?)).process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
        Ok(Self {
            name: name.into(),
            child,
            pid,
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the child has exited (a server that refused its config, say).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Wait for the first stdout line that contains `marker` and return what follows it; the
    /// rest of stdout is drained in the background so the child never blocks on a full pipe.
    pub async fn announced(&mut self, marker: &str) -> Result<String, String> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| format!("{}: stdout already taken", self.name))?;
        let mut lines = BufReader::new(stdout);
        let read = async {
            let mut line = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return None;
                }
                if let Some((_, rest)) = line.split_once(marker) {
                    return Some(rest.trim().to_owned());
                }
            }
        };
        let found = tokio::time::timeout(START_TIMEOUT, read).await;
        let mut rest = lines.into_inner();
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rest.read_to_end(&mut sink).await;
        });
        match found {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(format!(
                "{} exited before printing {marker:?} (see its log)",
                self.name
            )),
            Err(_) => Err(format!(
                "{} did not print {marker:?} within {START_TIMEOUT:?}",
                self.name
            )),
        }
    }

    /// The child's stdin and stdout, for a stdio MCP connection.
    pub fn stdio(&mut self) -> Result<(ChildStdin, ChildStdout), String> {
        match (self.child.stdin.take(), self.child.stdout.take()) {
            (Some(stdin), Some(stdout)) => Ok((stdin, stdout)),
            _ => Err(format!("{}: stdio already taken", self.name)),
        }
    }

    /// SIGTERM the process group, wait, and SIGKILL it if it lingers.
    pub async fn stop(mut self) {
        signal_group(self.pid, "TERM");
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "  {} did not stop within {STOP_TIMEOUT:?}; killing it",
                self.name
            );
            signal_group(self.pid, "KILL");
            let _ = self.child.wait().await;
        }
        // Whatever the leader left in its group (a peer's stdio child) goes too.
        signal_group(self.pid, "KILL");
        self.reaped = true;
    }

    /// Resident set size in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            signal_group(self.pid, "KILL");
            let _ = self.child.start_kill();
        }
    }
}

fn open_log(log: &Path) -> Result<File, String> {
    File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))
}

/// Signal every process in the group led by `pid` (the bench starts each child as a group leader).
fn signal_group(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a process from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it start with the state (field 3).
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// `CLK_TCK`, the unit of `/proc/PID/stat` times (100 on Linux unless told otherwise).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Where the binaries under test are, and where logs go.
pub struct Paths {
    pub broker: PathBuf,
    pub ledger: PathBuf,
    pub peers: PathBuf,
    pub out_dir: PathBuf,
    pub logs: PathBuf,
}

impl Paths {
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// A ledger serving Streamable HTTP on a free port; returns it and its MCP URL.
pub async fn start_ledger_http(paths: &Paths, name: &str) -> Result<(Proc, String), String> {
    let mut cmd = Command::new(&paths.ledger);
    cmd.args(["http", "127.0.0.1:0"]).env("RUST_LOG", "warn");
    let mut proc = Proc::spawn(name, cmd, &paths.log(name))?;
    let url = proc.announced("listening on ").await?;
    Ok((proc, url))
}

/// A ledger over stdio, for the load generator to speak to directly.
pub fn start_ledger_stdio(paths: &Paths, name: &str) -> Result<Proc, String> {
    let mut cmd = Command::new(&paths.ledger);
    cmd.arg("stdio").env("RUST_LOG", "warn");
    Proc::spawn(name, cmd, &paths.log(name))
}

/// The broker with `config`; returns it and its MCP URL once it listens.
pub async fn start_broker(
    paths: &Paths,
    name: &str,
    config: &Path,
) -> Result<(Proc, String), String> {
    start_broker_with_env(paths, name, config, &[]).await
}

/// As [`start_broker`], with more environment variables (`[cluster]`'s secret key).
pub async fn start_broker_with_env(
    paths: &Paths,
    name: &str,
    config: &Path,
    env: &[(&str, &str)],
) -> Result<(Proc, String), String> {
    let mut cmd = Command::new(&paths.broker);
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    let mut proc = Proc::spawn(name, cmd, &paths.log(name))?;
    let url = proc.announced("mcp-broker listening on ").await?;
    Ok((proc, url))
}

/// A free loopback port for a peer gateway that cannot be told to pick one and report it.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}
