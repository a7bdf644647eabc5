//! `mcp-broker import` and `mcp-broker init`: from a client's MCP config to a `servers.toml`.
//!
//! Reads the four shapes clients write: Claude Desktop's `claude_desktop_config.json`, Claude Code's
//! `.mcp.json` and Cursor's `mcp.json` (all under `mcpServers`), and VS Code's `mcp.json` (under
//! `servers`, with `inputs`; JSON with comments). Each entry becomes one `[servers.NAME]` table with
//! `transport` written explicitly.
//!
//! Secrets never reach the output: an env value, header value, URL or argument that looks like a
//! secret (by its name or its shape) becomes a `${VAR}` placeholder, and only the variable's name is
//! reported. References the client would have resolved (`${env:X}`, `${input:id}`, Claude Code's
//! `${X}` and `${X:-default}`) become `${X}` placeholders too. What the broker cannot express is
//! reported as a warning, never silently dropped.
//!
//! Layer 1: uses [`crate::config`] only for the name rules and, in tests, to parse what it writes.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use crate::config::uri_prefix;

mod jsonc;
mod secrets;
use jsonc::strip_jsonc;
use secrets::{secret_name, secret_value, url_has_password};

/// Client config files are a few KB; anything past this is not one.
pub const MAX_INPUT_BYTES: u64 = 4 * 1024 * 1024;
/// Nesting deeper than this is not a client config (serde_json itself stops at 128).
const MAX_DEPTH: usize = 32;
/// Longest server name the broker takes (see `config.rs`), less room for a `-NN` suffix.
const MAX_NAME: usize = 28;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {limit} bytes: not an MCP client config")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}:{line}:{column}: not JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: nested deeper than {MAX_DEPTH} levels: not an MCP client config")]
    TooDeep { path: PathBuf },
    #[error("{path}: {message}")]
    Shape { path: PathBuf, message: String },
    #[error("--listen \"{value}\" is not an address (use e.g. \"127.0.0.1:8080\")")]
    Listen { value: String },
    #[error("{path} exists: pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Which client wrote the file: decides the label in messages and the default working directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    ClaudeDesktop,
    ClaudeCode,
    /// `~/.claude.json`: Claude Code's user and local scopes (no project folder).
    ClaudeCodeUser,
    Cursor,
    VsCode,
    /// `mcpServers` in a file whose name says nothing more.
    Generic,
}

impl Client {
    pub fn label(self) -> &'static str {
        match self {
            Self::ClaudeDesktop => "Claude Desktop",
            Self::ClaudeCode => "Claude Code",
            Self::ClaudeCodeUser => "Claude Code, user config",
            Self::Cursor => "Cursor",
            Self::VsCode => "VS Code",
            Self::Generic => "an `mcpServers` file",
        }
    }

    /// Project-scoped files start their servers in the project folder; Desktop's have no set folder.
    fn project_scoped(self) -> bool {
        !matches!(
            self,
            Self::ClaudeDesktop | Self::ClaudeCodeUser | Self::Generic
        )
    }
}

/// A `${VAR}` the generated file needs set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    /// Where it is used: `servers.github.env.GITHUB_TOKEN`.
    pub used_by: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A secret written in the source file: copy its value from there (it is not shown).
    Secret,
    /// The source already read it from the environment.
    Environment,
    /// Claude Code's `${VAR:-default}`: the broker has no defaults, so it must be set.
    EnvironmentWithDefault,
    /// A VS Code `${input:id}` prompt; its description, when the file gave one.
    Input(Option<String>),
    /// A name in an `envFile` the client loaded.
    EnvFile(PathBuf),
}

/// The result of an import: the file text and what to tell the user.
#[derive(Debug)]
pub struct Imported {
    pub client: Client,
    pub toml: String,
    /// The broker's server names, in file order.
    pub servers: Vec<String>,
    pub variables: Vec<Variable>,
    pub warnings: Vec<String>,
}

/// Read a client config, bounded in size.
pub fn read_bounded(path: &Path) -> Result<String, ImportError> {
    use std::io::Read;
    let read = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(ImportError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_INPUT_BYTES,
        });
    }
    Ok(text)
}

/// Convert a client config read from `path` (used for its name and folder) into a `servers.toml`.
pub fn convert(path: &Path, text: &str, listen: &str) -> Result<Imported, ImportError> {
    let shape = |message: String| ImportError::Shape {
        path: path.to_path_buf(),
        message,
    };
    let json: Value = serde_json::from_str(&strip_jsonc(text)).map_err(|e| ImportError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    if depth(&json) > MAX_DEPTH {
        return Err(ImportError::TooDeep {
            path: path.to_path_buf(),
        });
    }
    let Value::Object(top) = &json else {
        return Err(shape("the top level is not a JSON object".into()));
    };
    let (entries, client) = match (top.get("servers"), top.get("mcpServers")) {
        (Some(Value::Object(s)), _) => (s, Client::VsCode),
        (_, Some(Value::Object(s))) => (s, client_of(path)),
        _ => {
            return Err(shape(
                "no `mcpServers` (Claude Desktop, Claude Code, Cursor) or `servers` (VS Code) object"
                    .into(),
            ));
        }
    };
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let folder = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    // `.vscode/mcp.json` and `.cursor/mcp.json` live in the project's folder: the workspace is above.
    let workspace = match folder.file_name().and_then(|n| n.to_str()) {
        Some(".vscode" | ".cursor") => folder.parent().map(Path::to_path_buf).unwrap_or(folder),
        _ => folder,
    };
    let mut cx = Cx {
        workspace,
        inputs: inputs_of(top),
        variables: Vec::new(),
        values: Vec::new(),
        reserved: referenced_names(text),
        warnings: Vec::new(),
    };
    if top.contains_key("projects") {
        cx.warnings.push(
            "per-project servers under `projects` are not imported (only the top-level ones): import the project's `.mcp.json`, or copy them by hand".into(),
        );
    }
    let mut used_prefixes = BTreeSet::new();
    let mut servers = Vec::new();
    let mut body = String::new();
    for (source_name, entry) in entries {
        let name = unique_name(source_name, &mut used_prefixes);
        let Value::Object(entry) = entry else {
            cx.warnings
                .push(format!("`{source_name}`: not an object; skipped"));
            continue;
        };
        // A skipped server leaves no variable behind.
        let before = (cx.variables.clone(), cx.values.clone());
        match cx.server(&name, source_name, entry, client) {
            Ok(Some(table)) => {
                body.push_str(&table);
                servers.push(name);
            }
            Ok(None) => (cx.variables, cx.values) = before,
            Err(why) => {
                (cx.variables, cx.values) = before;
                cx.warnings.push(format!("`{source_name}`: {why}; skipped"));
            }
        }
    }
    let toml = render(&abs, client, listen, &cx.variables, &body);
    Ok(Imported {
        client,
        toml,
        servers,
        variables: cx.variables,
        warnings: cx.warnings,
    })
}

fn client_of(path: &Path) -> Client {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    match (parent, file) {
        (_, "claude_desktop_config.json") => Client::ClaudeDesktop,
        (_, ".mcp.json") => Client::ClaudeCode,
        (_, ".claude.json") => Client::ClaudeCodeUser,
        (".cursor", _) => Client::Cursor,
        (".vscode", _) => Client::VsCode,
        _ => Client::Generic,
    }
}

fn inputs_of(top: &serde_json::Map<String, Value>) -> Vec<(String, Option<String>)> {
    let Some(Value::Array(list)) = top.get("inputs") else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|i| {
            let id = i.get("id")?.as_str()?.to_string();
            let description = i
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((id, description))
        })
        .collect()
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A broker server name for `raw`: lower case, `A-Z a-z 0-9 - _` only, no `__` (the default
/// separator), unique among `used` by the resource URI prefix (which folds case and `-`/`_`).
fn unique_name(raw: &str, used: &mut BTreeSet<String>) -> String {
    let mut base = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            c.to_ascii_lowercase()
        } else {
            '-'
        };
        if (c == '-' || c == '_') && (base.is_empty() || base.ends_with(['-', '_'])) {
            continue;
        }
        base.push(c);
    }
    base.truncate(MAX_NAME);
    let base = base.trim_end_matches(['-', '_']).to_string();
    let base = if base.is_empty() {
        "server".to_string()
    } else {
        base
    };
    let mut name = base.clone();
    let mut n = 2;
    while !used.insert(uri_prefix(&name)) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// `github-server` + `api key` → `GITHUB_SERVER_API_KEY`: a shell variable name.
fn upper_snake(parts: &[&str]) -> String {
    let mut s = String::new();
    for part in parts {
        for c in part.chars() {
            if c.is_ascii_alphanumeric() {
                s.push(c.to_ascii_uppercase());
            } else if !s.is_empty() && !s.ends_with('_') {
                s.push('_');
            }
        }
        if !s.is_empty() && !s.ends_with('_') {
            s.push('_');
        }
    }
    let s = s.trim_end_matches('_').to_string();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        format!("MCP_{s}")
    } else {
        s
    }
}

/// What one value became.
struct Converted {
    text: String,
    /// It held a reference the client would have resolved (so it is not a literal secret).
    referenced: bool,
}

struct Cx {
    workspace: PathBuf,
    inputs: Vec<(String, Option<String>)>,
    variables: Vec<Variable>,
    /// Names the file's references use: a secret's placeholder never takes one (it would stand for
    /// another value).
    reserved: BTreeSet<String>,
    /// The value behind each secret placeholder, only to give one value one name; never output.
    values: Vec<(String, String)>,
    warnings: Vec<String>,
}

impl Cx {
    /// One `[servers.NAME]` table, or `None` when the entry is skipped with a warning.
    fn server(
        &mut self,
        name: &str,
        source_name: &str,
        entry: &serde_json::Map<String, Value>,
        client: Client,
    ) -> Result<Option<String>, String> {
        if entry.get("disabled").and_then(Value::as_bool) == Some(true) {
            self.warnings.push(format!(
                "`{source_name}`: disabled in the source file; skipped"
            ));
            return Ok(None);
        }
        const KNOWN: &[&str] = &[
            "type",
            "command",
            "args",
            "env",
            "envFile",
            "cwd",
            "url",
            "headers",
            "disabled",
            "dev",
            "gallery",
            "version",
            "description",
        ];
        let ignored: Vec<&str> = entry
            .keys()
            .map(String::as_str)
            .filter(|k| !KNOWN.contains(k))
            .collect();
        if !ignored.is_empty() {
            self.warnings.push(format!(
                "`{source_name}`: ignored key{} {} (no broker equivalent)",
                if ignored.len() == 1 { "" } else { "s" },
                ignored.join(", ")
            ));
        }
        let kind = entry.get("type").and_then(Value::as_str);
        let t = format!("servers.{name}");
        let mut out = String::new();
        if source_name != name {
            let _ = writeln!(out, "# `{}` in the source file", comment_safe(source_name));
        }
        let _ = writeln!(out, "[servers.{name}]");
        match (entry.get("command"), entry.get("url")) {
            (Some(Value::String(command)), _) if !matches!(kind, Some("http" | "sse")) => {
                self.stdio(&mut out, &t, name, command, entry, client)?;
            }
            (_, Some(Value::String(url))) => self.remote(&mut out, &t, name, url, kind, entry)?,
            _ => {
                return Err(match kind {
                    Some(k) => {
                        format!("type \"{k}\" needs a `command` (stdio) or a `url` (http, sse)")
                    }
                    None => "neither a `command` nor a `url`".into(),
                });
            }
        }
        out.push('\n');
        Ok(Some(out))
    }

    /// The keys of a stdio server (`command`, `args`, `cwd`, `env`, `envFile`).
    fn stdio(
        &mut self,
        out: &mut String,
        t: &str,
        name: &str,
        command: &str,
        entry: &serde_json::Map<String, Value>,
        client: Client,
    ) -> Result<(), String> {
        let _ = writeln!(out, "transport = \"stdio\"");
        let command = self.value(&format!("{t}.command"), command, false, name, "command")?;
        let _ = writeln!(out, "command = {}", quote(&command));
        let args = self.args(t, name, entry.get("args"))?;
        if !args.is_empty() {
            let list: Vec<String> = args.iter().map(|a| quote(a)).collect();
            let _ = writeln!(out, "args = [{}]", list.join(", "));
        }
        match entry.get("cwd").and_then(Value::as_str) {
            Some(cwd) => {
                let cwd = self.value(&format!("{t}.cwd"), cwd, false, name, "cwd")?;
                let cwd = if cwd.starts_with('/') || cwd.starts_with("${") {
                    cwd
                } else {
                    format!(
                        "{}/{cwd}",
                        escape_dollars(&self.workspace.to_string_lossy())
                    )
                };
                let _ = writeln!(out, "cwd = {}", quote(&cwd));
            }
            None if client.project_scoped() => {
                let _ = writeln!(
                    out,
                    "# {} starts project servers in the project folder",
                    client.label()
                );
                let cwd = escape_dollars(&self.workspace.to_string_lossy());
                let _ = writeln!(out, "cwd = {}", quote(&cwd));
            }
            None => {}
        }
        let mut env = self.map(t, "env", name, entry.get("env"))?;
        if let Some(file) = entry.get("envFile").and_then(Value::as_str) {
            env.extend(self.env_file(t, file));
        }
        if !env.is_empty() {
            let _ = writeln!(out, "env = {}", inline_table(&env));
        }
        Ok(())
    }

    /// The keys of an http or sse server (`url`, `headers`); `kind` is the client's `type`.
    fn remote(
        &mut self,
        out: &mut String,
        t: &str,
        name: &str,
        url: &str,
        kind: Option<&str>,
        entry: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        let transport = match kind {
            Some("sse") => "sse",
            Some("http" | "streamable-http" | "streamableHttp") => "http",
            None if url.trim_end_matches('/').ends_with("/sse") => "sse",
            None => "http",
            Some(other) => return Err(format!("unknown type \"{other}\" with a `url`")),
        };
        let _ = writeln!(out, "transport = \"{transport}\"");
        let secret_query = url.split_once('?').is_some_and(|(_, q)| {
            q.split('&').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, v)| secret_name(k) || secret_value(v))
            })
        });
        let url = if secret_query || url_has_password(url) {
            self.placeholder(&format!("{t}.url"), &[name, "url"], url)
        } else {
            self.value(&format!("{t}.url"), url, false, name, "url")?
        };
        let _ = writeln!(out, "url = {}", quote(&url));
        let headers = self.map(t, "headers", name, entry.get("headers"))?;
        if !headers.is_empty() {
            let _ = writeln!(out, "headers = {}", inline_table(&headers));
        }
        Ok(())
    }

    /// `args`: references translated; a secret-looking argument, `--token=…` or the value after
    /// `--token`, becomes a placeholder.
    fn args(&mut self, t: &str, server: &str, args: Option<&Value>) -> Result<Vec<String>, String> {
        let Some(args) = args else {
            return Ok(Vec::new());
        };
        let Value::Array(args) = args else {
            return Err("`args` is not a list".into());
        };
        let mut out = Vec::with_capacity(args.len());
        let mut secret_flag: Option<String> = None;
        for (i, a) in args.iter().enumerate() {
            let a = match a {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => a.to_string(),
                _ => return Err(format!("`args[{i}]` is not a string")),
            };
            let used_by = format!("{t}.args[{i}]");
            let converted = self.convert(&used_by, &a)?;
            let flag = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
            let text = if converted.referenced {
                converted.text
            } else if let Some(flag) = secret_flag.take() {
                self.placeholder(&used_by, &[server, &flag], &a)
            } else if let Some((k, v)) = flag.and_then(|f| f.split_once('='))
                && (secret_name(k) || secret_value(v))
            {
                let k = k.to_string();
                let p = self.placeholder(&used_by, &[server, &k], v);
                format!("{}={p}", a.split_once('=').map_or("", |(f, _)| f))
            } else if secret_value(&a) {
                self.placeholder(&used_by, &[server, &format!("arg {i}")], &a)
            } else {
                converted.text
            };
            if let Some(f) = flag
                && !f.contains('=')
                && secret_name(f)
            {
                secret_flag = Some(f.to_string());
            }
            out.push(text);
        }
        Ok(out)
    }

    /// `env` or `headers`: each value translated, secrets replaced by placeholders.
    fn map(
        &mut self,
        t: &str,
        key: &str,
        server: &str,
        map: Option<&Value>,
    ) -> Result<Vec<(String, String)>, String> {
        let Some(map) = map else {
            return Ok(Vec::new());
        };
        let Value::Object(map) = map else {
            return Err(format!("`{key}` is not an object"));
        };
        let header = key == "headers";
        let mut out = Vec::new();
        for (k, v) in map {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => v.to_string(),
                Value::Null => continue,
                _ => return Err(format!("`{key}.{k}` is not a string")),
            };
            let v = self.value(&format!("{t}.{key}.{k}"), &v, header, server, k)?;
            out.push((k.clone(), v));
        }
        Ok(out)
    }

    /// One value: references translated; a literal secret (by `name` or by shape) replaced by a
    /// placeholder, keeping an HTTP auth scheme (`Bearer ${VAR}`) in front.
    fn value(
        &mut self,
        used_by: &str,
        raw: &str,
        header: bool,
        server: &str,
        name: &str,
    ) -> Result<String, String> {
        let converted = self.convert(used_by, raw)?;
        let by_name = !matches!(name, "command" | "cwd" | "url") && secret_name(name);
        if converted.referenced || !(by_name || secret_value(raw)) {
            return Ok(converted.text);
        }
        // Env names are kept when they already say which server they belong to.
        let prefix = upper_snake(&[server]);
        let own = upper_snake(&[name]);
        let var_parts: Vec<&str> =
            if !header && (own == prefix || own.starts_with(&format!("{prefix}_"))) {
                vec![name]
            } else {
                vec![server, name]
            };
        if header
            && let Some((scheme, token)) = raw.trim().split_once(' ')
            && ["bearer", "basic", "token"].contains(&scheme.to_ascii_lowercase().as_str())
        {
            let p = self.placeholder(used_by, &var_parts, token.trim());
            return Ok(format!("{scheme} {p}"));
        }
        Ok(self.placeholder(used_by, &var_parts, raw))
    }

    /// `${NAME}` for a literal secret `value`; one value keeps one name, two values never share one.
    fn placeholder(&mut self, used_by: &str, parts: &[&str], value: &str) -> String {
        let base = upper_snake(parts);
        if let Some((name, _)) = self
            .values
            .iter()
            .find(|(n, v)| v == value && (n == &base || n.starts_with(&format!("{base}_"))))
        {
            let name = name.clone();
            self.note(&name, used_by, Origin::Secret);
            return format!("${{{name}}}");
        }
        let mut name = base.clone();
        let mut n = 2;
        while self.variables.iter().any(|v| v.name == name) || self.reserved.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.values.push((name.clone(), value.to_string()));
        self.note(&name, used_by, Origin::Secret);
        format!("${{{name}}}")
    }

    fn note(&mut self, name: &str, used_by: &str, origin: Origin) {
        if let Some(v) = self.variables.iter_mut().find(|v| v.name == name) {
            if !v.used_by.split(", ").any(|u| u == used_by) {
                v.used_by.push_str(", ");
                v.used_by.push_str(used_by);
            }
            return;
        }
        self.variables.push(Variable {
            name: name.to_string(),
            used_by: used_by.to_string(),
            origin,
        });
    }

    /// Translate the client's `${…}` references into the broker's; a literal `$` becomes `$$`.
    fn convert(&mut self, used_by: &str, raw: &str) -> Result<Converted, String> {
        let mut text = String::with_capacity(raw.len());
        let mut referenced = false;
        let mut rest = raw;
        while let Some(i) = rest.find('$') {
            text.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let Some(body) = after.strip_prefix('{') else {
                text.push_str("$$");
                rest = after;
                continue;
            };
            let Some(end) = body.find('}') else {
                text.push_str("$$");
                rest = after;
                continue;
            };
            let reference = &body[..end];
            rest = &body[end + 1..];
            match reference {
                "workspaceFolder" | "workspaceRoot" => {
                    text.push_str(&escape_dollars(&self.workspace.to_string_lossy()));
                }
                "workspaceFolderBasename" => {
                    let base = self
                        .workspace
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    text.push_str(&escape_dollars(&base));
                }
                "userHome" => {
                    // HOME is always set (and inherited by stdio children): nothing to export.
                    text.push_str("${HOME}");
                }
                "pathSeparator" | "/" => text.push('/'),
                _ => {
                    let (var, origin) = if let Some(name) = reference.strip_prefix("env:") {
                        (name.to_string(), Origin::Environment)
                    } else if let Some(id) = reference.strip_prefix("input:") {
                        let description = self
                            .inputs
                            .iter()
                            .find(|(i, _)| i == id)
                            .and_then(|(_, d)| d.clone());
                        (upper_snake(&[id]), Origin::Input(description))
                    } else {
                        // Claude Code: `${VAR}` and `${VAR:-default}`.
                        let name = reference.split_once(":-").map_or(reference, |(n, _)| n);
                        if name.is_empty()
                            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        {
                            return Err(format!(
                                "`${{{reference}}}` is resolved by the client only; the broker has no equivalent"
                            ));
                        }
                        let origin = if reference.contains(":-") {
                            Origin::EnvironmentWithDefault
                        } else {
                            Origin::Environment
                        };
                        (name.to_string(), origin)
                    };
                    let _ = write!(text, "${{{var}}}");
                    self.note(&var, used_by, origin);
                    referenced = true;
                }
            }
        }
        text.push_str(rest);
        Ok(Converted { text, referenced })
    }

    /// The names in an `envFile` (its values are never read into the output): each becomes `${NAME}`.
    fn env_file(&mut self, t: &str, file: &str) -> Vec<(String, String)> {
        let file = file.replace("${workspaceFolder}", &self.workspace.to_string_lossy());
        let path = self.workspace.join(&file);
        let text = match std::fs::metadata(&path) {
            Ok(m) if m.len() <= MAX_INPUT_BYTES => std::fs::read_to_string(&path).ok(),
            _ => None,
        };
        let Some(text) = text else {
            self.warnings.push(format!(
                "`{t}`: envFile {} cannot be read: export its variables and add them to `env` by hand",
                path.display()
            ));
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, _)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim();
            if line.starts_with('#')
                || k.is_empty()
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            self.note(k, &format!("{t}.env.{k}"), Origin::EnvFile(path.clone()));
            out.push((k.to_string(), format!("${{{k}}}")));
        }
        out
    }
}

/// The variable names of every `${…}` reference in the file (as [`Cx::convert`] names them).
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find('}') else { break };
        let reference = &rest[..end];
        if let Some(name) = reference.strip_prefix("env:") {
            out.insert(name.to_string());
        } else if let Some(id) = reference.strip_prefix("input:") {
            out.insert(upper_snake(&[id]));
        } else {
            out.insert(
                reference
                    .split_once(":-")
                    .map_or(reference, |(n, _)| n)
                    .to_string(),
            );
        }
    }
    out
}

fn escape_dollars(s: &str) -> String {
    s.replace('$', "$$")
}

fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        quote(k)
    }
}

fn inline_table(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{} = {}", toml_key(k), quote(v)))
        .collect();
    format!("{{ {} }}", items.join(", "))
}

fn render(
    source: &Path,
    client: Client,
    listen: &str,
    variables: &[Variable],
    body: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# servers.toml for mcp-broker, imported from {} ({}).",
        comment_safe(&source.display().to_string()),
        client.label()
    );
    out.push_str("# Check it with `mcp-broker check -c FILE`; the README's configuration reference lists every key.\n");
    if !variables.is_empty() {
        out.push_str("#\n# Values that looked like secrets, and references the client resolved, are ${VAR} placeholders.\n");
        out.push_str("# Export these before `check` or `serve` (the broker refuses to start with one unset):\n");
        for v in variables {
            let _ = writeln!(out, "#   {:<32} {}", v.name, origin_note(v));
        }
    }
    out.push_str(
        "#\n# Stdio servers start with a cleared environment plus PATH, HOME, LANG and TMPDIR\n",
    );
    out.push_str("# (`inherit_env` on a server widens that).\n\n");
    out.push_str("[broker]\n");
    out.push_str(
        "# Loopback only: without [auth] the broker must not be reachable from other machines.\n",
    );
    let _ = writeln!(out, "listen = {}\n", quote(listen));
    out.push_str(body);
    out
}

fn origin_note(v: &Variable) -> String {
    let from = match &v.origin {
        Origin::Secret => "a secret in the source file (copy its value from there)".to_string(),
        Origin::Environment => "read from the environment by the client too".to_string(),
        Origin::EnvironmentWithDefault => {
            "read from the environment by the client, with a default in the source file (the broker has none: set it)".to_string()
        }
        Origin::Input(Some(d)) => format!("a VS Code input: {}", comment_safe(d)),
        Origin::Input(None) => "a VS Code input".to_string(),
        Origin::EnvFile(p) => format!("from {}", comment_safe(&p.display().to_string())),
    };
    format!("{from}; used by {}", v.used_by)
}

/// Where the generated file goes: a new file, or stdout.
fn write_new(path: &Path, text: &str, force: bool) -> Result<(), ImportError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            ImportError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            ImportError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    file.write_all(text.as_bytes())
        .map_err(|source| ImportError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// The lines that point a client at the broker serving `config`.
pub fn client_hints(listen: &str, config: &Path) -> String {
    let abs = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    let port = listen.rsplit_once(':').map_or("8080", |(_, p)| p);
    let desktop = serde_json::json!({
        "mcpServers": { "broker": { "command": "mcp-broker", "args": ["stdio", "-c", abs.to_string_lossy()] } }
    });
    format!(
        "Point your client at the broker (after `mcp-broker serve -c {c}` for HTTP):\n  \
         Claude Code:    claude mcp add --transport http broker http://127.0.0.1:{port}/mcp\n  \
         Claude Desktop: {desktop}\n",
        c = abs.display()
    )
}

/// `mcp-broker import FILE [--out F] [--force] [--listen ADDR]`.
pub fn run_import(
    file: &Path,
    out: Option<&Path>,
    force: bool,
    listen: &str,
) -> Result<ExitCode, ImportError> {
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(ImportError::Listen {
            value: listen.to_string(),
        });
    }
    let text = read_bounded(file)?;
    let imported = convert(file, &text, listen)?;
    let target = out.unwrap_or(Path::new("servers.toml"));
    match out {
        Some(path) => write_new(path, &imported.toml, force)?,
        None => print!("{}", imported.toml),
    }
    // With the TOML on stdout, everything said to the person goes to stderr.
    let mut say = String::new();
    let _ = writeln!(
        say,
        "imported {} server{} from {} ({}){}",
        imported.servers.len(),
        if imported.servers.len() == 1 { "" } else { "s" },
        file.display(),
        imported.client.label(),
        out.map(|p| format!(" into {}", p.display()))
            .unwrap_or_default()
    );
    for w in &imported.warnings {
        let _ = writeln!(say, "warning: {w}");
    }
    if !imported.variables.is_empty() {
        let _ = writeln!(
            say,
            "\nExport these variables before `mcp-broker check` or `serve` (names only; values are not shown):"
        );
        for v in &imported.variables {
            let _ = writeln!(
                say,
                "  {:<40} # {}",
                format!("export {}=…", v.name),
                origin_note(v)
            );
        }
    }
    let _ = writeln!(say, "\nThen: mcp-broker check -c {}", target.display());
    say.push_str(&client_hints(listen, target));
    if out.is_some() {
        print!("{say}");
    } else {
        eprint!("{say}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `mcp-broker init [--out F] [--force]`.
pub fn run_init(out: &Path, force: bool) -> Result<ExitCode, ImportError> {
    write_new(out, STARTER, force)?;
    println!(
        "wrote {}; check it with `mcp-broker check -c {}`",
        out.display(),
        out.display()
    );
    print!("{}", client_hints("127.0.0.1:8080", out));
    Ok(ExitCode::SUCCESS)
}

/// What `mcp-broker init` writes: valid as is, the rest commented out.
pub const STARTER: &str = include_str!("import/starter.toml");

#[cfg(test)]
mod tests;
