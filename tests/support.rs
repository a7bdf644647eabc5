//! Shared helpers for the Rust integration tests: start the real broker binary on port 0 against the
//! real example upstreams, and always stop it (kill on drop).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn broker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mcp-broker"))
}

/// `target/<profile>/examples/<name>`: cargo builds the examples before integration tests.
pub fn example_bin(name: &str) -> PathBuf {
    let bin = broker_bin();
    let dir = bin.parent().map(Path::to_path_buf).unwrap_or_default();
    dir.join("examples").join(name)
}

pub struct Broker {
    pub child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `mcp-broker serve` with `servers` appended to a `[broker]` table on 127.0.0.1:0, and wait
/// until it has announced its URL and `expect_tool` appears in its catalog (polled, with a deadline).
pub fn start_broker(servers: &str) -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("servers.toml");
    std::fs::write(
        &path,
        format!("[broker]\nlisten = \"127.0.0.1:0\"\n\n{servers}"),
    )
    .expect("write config");
    let mut child = Command::new(broker_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read announce line");
    let url = line
        .trim()
        .strip_prefix("mcp-broker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Broker {
        child,
        url,
        _dir: dir,
    }
}

/// Poll `f` until it returns `Some`, or panic after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Proptest cases per property: `PROPTEST_CASES` when set, else `default` (`Config::with_cases`
/// alone would ignore the variable); failures are printed, not saved beside the test.
pub fn proptest_cases(default: u32) -> proptest::test_runner::Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        failure_persistence: None,
        ..proptest::test_runner::Config::with_cases(n)
    }
}

/// A `redis-server` of this test's own, without persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// `None` when `redis-server` is missing and `MCP_BROKER_SKIP_REDIS=1`; a failure when it is
    /// missing otherwise.
    pub fn start() -> Option<Redis> {
        let found = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
        });
        if !found {
            if std::env::var("MCP_BROKER_SKIP_REDIS").as_deref() == Ok("1") {
                eprintln!("skipped: redis-server is not on PATH (MCP_BROKER_SKIP_REDIS=1)");
                return None;
            }
            panic!(
                "redis-server is not on PATH: install it (apt-get install redis-server) or set \
                 MCP_BROKER_SKIP_REDIS=1 to skip the cluster tests"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        Some(Self::on(port))
    }

    /// Start (or restart) on `port`, and wait until it accepts connections.
    pub fn on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
