//! Each client's file shape (fixtures in `tests/fixtures/import/`), what the output holds, that no
//! secret reaches it, and that it parses as a broker config.

use std::path::{Path, PathBuf};

use super::*;
use crate::config::{Config, TransportConfig};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(rel)
}

fn import(rel: &str) -> Imported {
    let path = fixture(rel);
    let text = read_bounded(&path).expect("fixture readable");
    convert(&path, &text, "127.0.0.1:8080").expect("fixture converts")
}

/// Parse the output with every placeholder set (to a value that is valid wherever it is used).
fn parse(i: &Imported) -> Config {
    let names: Vec<String> = i.variables.iter().map(|v| v.name.clone()).collect();
    let env = move |k: &str| -> Option<String> {
        if k == "HOME" {
            return Some("/home/u".into());
        }
        names.iter().any(|n| n == k).then(|| {
            if k.ends_with("URL") {
                "https://h.example".into()
            } else {
                "x".into()
            }
        })
    };
    Config::parse(Path::new("/tmp/imported.toml"), &i.toml, &env)
        .unwrap_or_else(|e| panic!("generated TOML does not parse: {e}\n{}", i.toml))
}

fn vars(i: &Imported) -> Vec<&str> {
    i.variables.iter().map(|v| v.name.as_str()).collect()
}

fn assert_no_secret(i: &Imported, secrets: &[&str]) {
    let said = format!("{}{:?}{:?}", i.toml, i.variables, i.warnings);
    for s in secrets {
        assert!(!said.contains(s), "secret {s} leaked:\n{said}");
    }
}

fn stdio(c: &Config, name: &str) -> (String, Vec<String>, Vec<(String, String)>, PathBuf) {
    match &c
        .server(name)
        .unwrap_or_else(|| panic!("no server {name}"))
        .transport
    {
        TransportConfig::Stdio {
            command,
            args,
            env,
            cwd,
            ..
        } => (
            command.clone(),
            args.clone(),
            env.iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
            cwd.clone(),
        ),
        other => panic!("{name} is not stdio: {other:?}"),
    }
}

fn remote(c: &Config, name: &str) -> (&'static str, String, Vec<(String, String)>) {
    let s = c.server(name).unwrap_or_else(|| panic!("no server {name}"));
    let (kind, url, headers) = match &s.transport {
        TransportConfig::Http { url, headers, .. } => ("http", url, headers),
        TransportConfig::Sse { url, headers, .. } => ("sse", url, headers),
        other => panic!("{name} is not remote: {other:?}"),
    };
    (
        kind,
        url.to_string(),
        headers
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect(),
    )
}

#[test]
fn claude_desktop() {
    let i = import("claude_desktop_config.json");
    assert_eq!(i.client, Client::ClaudeDesktop);
    assert_eq!(
        i.servers,
        [
            "filesystem",
            "memory",
            "github",
            "brave-search",
            "postgres",
            "time",
            "time-2"
        ]
    );
    assert_no_secret(
        &i,
        &["ghp_FAKEfixture", "BSAfixtureFAKE", "FixturePassw0rd"],
    );
    assert_eq!(
        vars(&i),
        [
            "GITHUB_PERSONAL_ACCESS_TOKEN",
            "BRAVE_SEARCH_BRAVE_API_KEY",
            "POSTGRES_ARG_2"
        ]
    );
    assert!(i.variables.iter().all(|v| v.origin == Origin::Secret));
    assert!(i.toml.contains("transport = \"stdio\""));
    assert!(i.toml.contains("# `brave search` in the source file"));
    let c = parse(&i);
    let (command, args, env, _) = stdio(&c, "filesystem");
    assert_eq!(command, "npx");
    assert_eq!(
        args,
        [
            "-y",
            "@modelcontextprotocol/server-filesystem",
            "/Users/me/Desktop",
            "/Users/me/Downloads"
        ]
    );
    assert!(env.is_empty());
    let (_, _, env, _) = stdio(&c, "memory");
    assert_eq!(
        env,
        [("MEMORY_FILE_PATH".into(), "/Users/me/memory.json".into())]
    );
    let (_, _, env, _) = stdio(&c, "github");
    assert_eq!(env, [("GITHUB_PERSONAL_ACCESS_TOKEN".into(), "x".into())]);
    assert!(
        i.toml
            .contains("GITHUB_PERSONAL_ACCESS_TOKEN = \"${GITHUB_PERSONAL_ACCESS_TOKEN}\"")
    );
    let (_, args, _, _) = stdio(&c, "postgres");
    assert_eq!(args[2], "x");
    let (_, args, _, _) = stdio(&c, "time");
    assert_eq!(args, ["mcp-server-time", "--local-timezone=Europe/Paris"]);
    // A literal `$` survives the broker's `${…}` expansion.
    let (command, _, env, _) = stdio(&c, "time-2");
    assert_eq!(command, "/Users/me/venvs/mcp/bin/python");
    assert!(env.contains(&("PRICE".into(), "$5".into())), "{env:?}");
    assert!(env.contains(&("LOG_LEVEL".into(), "info".into())));
}

#[test]
fn claude_code() {
    let i = import("code/.mcp.json");
    assert_eq!(i.client, Client::ClaudeCode);
    assert_eq!(
        i.servers,
        ["shared-server", "api-server", "asana", "stripe", "airtable"]
    );
    assert_no_secret(&i, &["sk_live_FIXTURE", "patFIXTURE"]);
    assert_eq!(
        vars(&i),
        [
            "DEBUG",
            "SERVICE_API_KEY",
            "API_BASE_URL",
            "API_KEY",
            "STRIPE_AUTHORIZATION",
            "AIRTABLE_API_KEY"
        ]
    );
    assert_eq!(i.variables[0].origin, Origin::EnvironmentWithDefault);
    assert_eq!(i.variables[1].origin, Origin::Environment);
    let c = parse(&i);
    let (command, args, env, cwd) = stdio(&c, "shared-server");
    assert_eq!(command, "node");
    assert_eq!(args, ["./tools/server.js", "--verbose"]);
    assert_eq!(env.len(), 2);
    // Claude Code starts project servers in the project folder: relative args keep working.
    assert_eq!(cwd, fixture("code"));
    let (kind, url, headers) = remote(&c, "api-server");
    assert_eq!((kind, url.as_str()), ("http", "https://h.example/mcp"));
    assert_eq!(headers, [("Authorization".into(), "Bearer x".into())]);
    assert_eq!(remote(&c, "asana").0, "sse");
    let (kind, _, headers) = remote(&c, "stripe");
    assert_eq!(kind, "http");
    assert_eq!(headers, [("Authorization".into(), "Bearer x".into())]);
    assert!(
        i.toml
            .contains("Authorization = \"Bearer ${STRIPE_AUTHORIZATION}\"")
    );
    let (_, _, env, _) = stdio(&c, "airtable");
    assert_eq!(env, [("AIRTABLE_API_KEY".into(), "x".into())]);
}

#[test]
fn cursor() {
    let i = import(".cursor/mcp.json");
    assert_eq!(i.client, Client::Cursor);
    assert_eq!(
        i.servers,
        [
            "server-name",
            "userjot",
            "geonode-scraper",
            "legacy-sse",
            "local-python"
        ]
    );
    assert_no_secret(&i, &["cursorFIXTURE", "geoFIXTURE", "envfilepass"]);
    assert_eq!(
        vars(&i),
        [
            "SERVER_NAME_API_KEY",
            "USERJOT_API_TOKEN",
            "GEONODE_SCRAPER_X_API_KEY",
            "FIXTURE_DB_URL",
            "FIXTURE_MODE"
        ]
    );
    let c = parse(&i);
    let (_, _, env, _) = stdio(&c, "server-name");
    assert_eq!(env, [("API_KEY".into(), "x".into())]);
    let (kind, url, headers) = remote(&c, "userjot");
    assert_eq!(
        (kind, url.as_str()),
        ("http", "https://api.userjot.com/v1/mcp")
    );
    assert_eq!(headers, [("Authorization".into(), "Bearer x".into())]);
    let (_, _, headers) = remote(&c, "geonode-scraper");
    assert_eq!(headers, [("X-Api-Key".into(), "x".into())]);
    assert_eq!(remote(&c, "legacy-sse").0, "sse");
    // `${workspaceFolder}` is the folder holding `.cursor/`.
    let (command, args, env, cwd) = stdio(&c, "local-python");
    assert_eq!(command, "python");
    assert_eq!(args, [fixture("server.py").to_string_lossy().into_owned()]);
    assert_eq!(cwd, fixture(""));
    assert_eq!(env.len(), 2);
    assert!(matches!(&i.variables[3].origin, Origin::EnvFile(_)));
}

#[test]
fn vscode() {
    let i = import(".vscode/mcp.json");
    assert_eq!(i.client, Client::VsCode);
    assert_eq!(i.servers, ["perplexity", "fetch", "github", "my-remote"]);
    assert_no_secret(&i, &["vscodeFIXTURE"]);
    assert_eq!(
        vars(&i),
        ["PERPLEXITY_KEY", "FETCH_HTTP_TOKEN", "GITHUB_TOKEN"]
    );
    assert_eq!(
        i.variables[0].origin,
        Origin::Input(Some("Perplexity API Key".into()))
    );
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    let c = parse(&i);
    let (_, _, env, _) = stdio(&c, "perplexity");
    assert_eq!(env, [("PERPLEXITY_API_KEY".into(), "x".into())]);
    let (command, args, _, cwd) = stdio(&c, "fetch");
    assert_eq!(
        (command.as_str(), args),
        ("uvx", vec!["mcp-server-fetch".to_string()])
    );
    assert_eq!(cwd, fixture("tools"));
    let (kind, url, _) = remote(&c, "github");
    assert_eq!(
        (kind, url.as_str()),
        ("http", "https://api.githubcopilot.com/mcp/")
    );
    let (kind, _, headers) = remote(&c, "my-remote");
    assert_eq!(kind, "sse");
    assert_eq!(headers, [("X-Custom".into(), "not-a-secret".into())]);
}

#[test]
fn names_are_sanitised_and_unique() {
    let mut used = BTreeSet::new();
    assert_eq!(unique_name("My Server!", &mut used), "my-server");
    assert_eq!(unique_name("my_server", &mut used), "my_server-2");
    assert_eq!(unique_name("a__b", &mut used), "a_b");
    assert_eq!(unique_name("@@@", &mut used), "server");
    assert_eq!(unique_name(&"x".repeat(80), &mut used).len(), MAX_NAME);
}

#[test]
fn secret_shapes() {
    assert!(secret_name("GITHUB_PAT"));
    assert!(!secret_name("PATH"));
    assert!(secret_name("X-Api-Key"));
    assert!(!secret_name("LOG_LEVEL"));
    assert!(secret_value("Bearer abc"));
    assert!(secret_value("xoxb-1234-5678-abcdef"));
    assert!(secret_value("postgres://u:p@h/db"));
    assert!(!secret_value("postgres://h/db"));
    assert!(!secret_value("@modelcontextprotocol/server-filesystem"));
    assert!(!secret_value("/Users/me/venvs/mcp/bin/python3.12"));
    assert!(secret_value("Zq8f0K2mPx7Lw4Rt9Vb3Nc6Yh1"));
}

#[test]
fn refuses_bad_input() {
    let p = Path::new("x.json");
    assert!(matches!(
        convert(p, "[1]", "127.0.0.1:8080"),
        Err(ImportError::Shape { .. })
    ));
    assert!(matches!(
        convert(p, "{\"a\":1}", "127.0.0.1:8080"),
        Err(ImportError::Shape { .. })
    ));
    assert!(matches!(
        convert(p, "{", "127.0.0.1:8080"),
        Err(ImportError::Json { .. })
    ));
    let deep = format!("{}{}", "[".repeat(60), "]".repeat(60));
    assert!(matches!(
        convert(p, &deep, "127.0.0.1:8080"),
        Err(ImportError::TooDeep { .. })
    ));
    // A client-only reference skips that server, with a warning naming it.
    let i = convert(
        p,
        r#"{"servers":{"a":{"type":"stdio","command":"x","args":["${command:pick}"]},"b":{"command":"y"}}}"#,
        "127.0.0.1:8080",
    )
    .unwrap();
    assert_eq!(i.servers, ["b"]);
    assert!(i.warnings[0].contains("`a`"), "{:?}", i.warnings);
}

#[test]
fn a_secret_never_takes_a_referenced_name() {
    // `API_KEY` is read from the environment by one server; the other's literal key gets its own name.
    let i = convert(
        Path::new("x.json"),
        r#"{"mcpServers":{"api":{"command":"a","env":{"KEY":"Zq8f0K2mPx7Lw4Rt9Vb3Nc6Yh1"}},"b":{"command":"b","env":{"K":"${API_KEY}"}}}}"#,
        "127.0.0.1:8080",
    )
    .unwrap();
    assert_eq!(vars(&i), ["API_KEY_2", "API_KEY"]);
}

#[test]
fn comments_and_trailing_commas() {
    assert_eq!(
        strip_jsonc("{\"a\": \"//x\", /* c */ \"b\": [1,],}// end"),
        "{\"a\": \"//x\",  \"b\": [1]}"
    );
}

#[test]
fn starter_parses() {
    Config::parse(Path::new("/tmp/servers.toml"), STARTER, &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn never_overwrites_without_force() {
    let dir = std::env::temp_dir().join(format!("mcp-broker-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("servers.toml");
    let _ = std::fs::remove_file(&f);
    write_new(&f, "a", false).unwrap();
    assert!(matches!(
        write_new(&f, "b", false),
        Err(ImportError::Exists { .. })
    ));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "a");
    write_new(&f, "c", true).unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "c");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_in_urls_and_arguments() {
    let i = convert(
        Path::new("x.json"),
        r#"{"mcpServers":{
            "q": {"url": "https://h.example/mcp?api_key=FIXTUREqsecret1"},
            "cli": {"command": "srv", "args": ["--token", "FIXTUREflagsecret", "--db=postgres://u:FIXTUREpw@h/d", "--port", "8080"]},
            "gone": {"command": "x", "env": {"API_KEY": "FIXTUREgone1234"}, "args": ["${config:nope}"]}
        }}"#,
        "127.0.0.1:8080",
    )
    .unwrap();
    assert_no_secret(
        &i,
        &[
            "FIXTUREqsecret1",
            "FIXTUREflagsecret",
            "FIXTUREpw",
            "FIXTUREgone",
        ],
    );
    // The skipped server leaves no variable to export.
    assert_eq!(vars(&i), ["Q_URL", "CLI_TOKEN", "CLI_DB"]);
    assert!(
        i.toml
            .contains(r#"args = ["--token", "${CLI_TOKEN}", "--db=${CLI_DB}", "--port", "8080"]"#),
        "{}",
        i.toml
    );
    let c = parse(&i);
    assert_eq!(remote(&c, "q").1, "https://h.example/");
}
