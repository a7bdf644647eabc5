//! Secure defaults of `mcp-broker serve`: without `[auth]`, a non-loopback listen address is refused
//! unless `--insecure-no-auth` is given, and then the broker says so loudly.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("servers.toml");
    std::fs::write(&path, "[broker]\nlisten = \"0.0.0.0:0\"\n").expect("write");
    path
}

#[test]
fn non_loopback_without_auth_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["serve", "--config"])
        .arg(config(dir.path()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it must not have started listening");
}

#[test]
fn insecure_flag_serves_with_a_loud_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["serve", "--insecure-no-auth", "--config"])
        .arg(config(dir.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(
        line.starts_with("mcp-broker listening on http://0.0.0.0:"),
        "{line:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(err.contains("SERVING WITHOUT AUTHENTICATION"), "{err}");
}
