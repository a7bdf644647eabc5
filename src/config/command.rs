//! `mcp-broker check`'s look at each stdio `command`: is there an executable where the child's
//! spawn will look?
//!
//! The spawn (`std::process::Command`, cleared environment) runs in the child's `cwd` — the config
//! file's folder unless `cwd` says otherwise — so a command with a `/` is found relative to that
//! folder. A bare name is searched in the child's own `PATH` (its explicit `env`, else the broker's
//! when `inherit_env` passes it); a child without `PATH` gets libc's default search path, which for
//! glibc's `execvp` is `/bin:/usr/bin`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError, TransportConfig};

/// Where `execvp` looks when the child's environment has no `PATH` (glibc's `_CS_PATH`).
pub const DEFAULT_SEARCH_PATH: &str = "/bin:/usr/bin";

impl Config {
    /// Every stdio server's command resolved as its spawn will resolve it; the first that is missing
    /// or not executable is an error naming the server and the line of its `command`. `env` reads
    /// the broker's environment (what `inherit_env` passes on).
    pub fn check_commands(
        &self,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<(), ConfigError> {
        for s in &self.servers {
            let TransportConfig::Stdio {
                command,
                env: explicit,
                cwd,
                inherit_env,
                command_line,
                ..
            } = &s.transport
            else {
                continue;
            };
            let path = match explicit.iter().find(|(k, _)| k == "PATH") {
                Some((_, v)) => Some(OsString::from(v.expose())),
                None if inherit_env.iter().any(|k| k == "PATH") => env("PATH"),
                None => None,
            };
            if let Err(message) = resolve(command, cwd, path.as_deref()) {
                return Err(ConfigError::Invalid {
                    path: self.path.clone(),
                    line: *command_line,
                    key: format!("servers.{}.command", s.name),
                    message,
                });
            }
        }
        Ok(())
    }
}

/// The executable `command` names for a child started in `cwd` with `PATH` = `path` (`None`: not
/// set), or why there is none.
pub fn resolve(
    command: &str,
    cwd: &Path,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    if !cwd.is_dir() {
        return Err(format!(
            "the working directory {} (`cwd`, relative to the config file's folder) does not exist",
            cwd.display()
        ));
    }
    if command.contains('/') {
        let file = cwd.join(command);
        return match executable(&file) {
            Ok(()) => Ok(file),
            Err(why) => Err(format!(
                "`{command}` {why} (looked for {}; a command with a `/` is relative to the server's `cwd`, by default the config file's folder)",
                file.display()
            )),
        };
    }
    let (search, whence) = match path {
        Some(p) => (p.to_os_string(), "the child's PATH"),
        None => (
            OsString::from(DEFAULT_SEARCH_PATH),
            "the default search path, as the child gets no PATH (add it to `inherit_env` or `env`)",
        ),
    };
    let mut refused = None;
    for dir in std::env::split_paths(&search) {
        // An empty or relative entry is relative to the child's working directory.
        let file = cwd.join(dir).join(command);
        match executable(&file) {
            Ok(()) => return Ok(file),
            Err(why) if file.exists() => refused = Some(format!("{} {why}", file.display())),
            Err(_) => {}
        }
    }
    let shown = search.to_string_lossy();
    Err(match refused {
        Some(r) => format!("`{command}` is not executable: {r} (searched {whence}: {shown})"),
        None => format!("`{command}` was not found in {whence}: {shown}"),
    })
}

/// Can this file be executed (a regular file with an execute bit)?
fn executable(file: &Path) -> Result<(), &'static str> {
    let meta = std::fs::metadata(file).map_err(|_| "does not exist")?;
    if !meta.is_file() {
        return Err("is not a file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err("is not executable");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, mode: u32) {
        let file = dir.join(name);
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    fn load(dir: &Path, text: &str) -> Config {
        Config::parse(&dir.join("servers.toml"), text, &|_| None).unwrap()
    }

    #[test]
    fn a_relative_command_is_found_in_the_config_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "run.sh", 0o755);
        let c = load(dir.path(), "[servers.a]\ncommand = \"./run.sh\"\n");
        assert!(c.check_commands(&|_| None).is_ok());
        // Not where the broker runs, nor relative to anything else.
        let c = load(dir.path(), "[servers.a]\ncommand = \"./other.sh\"\n");
        let e = c.check_commands(&|_| None).unwrap_err().to_string();
        assert!(e.contains("servers.toml:2: `servers.a.command`"), "{e}");
        assert!(e.contains("`./other.sh` does not exist"), "{e}");
    }

    #[test]
    fn a_missing_command_names_the_server_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[servers.ok]\ncommand = \"sh\"\n\n[servers.gone]\nargs = []\ncommand = \"no-such-command-xyz\"\n";
        let c = load(dir.path(), text);
        let path = std::env::var_os("PATH");
        let e = c.check_commands(&|_| path.clone()).unwrap_err().to_string();
        assert!(
            e.contains("servers.toml:6: `servers.gone.command`: `no-such-command-xyz` was not found in the child's PATH"),
            "{e}"
        );
    }

    #[test]
    fn the_search_uses_the_childs_path_not_the_brokers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        script(&dir.path().join("bin"), "tool", 0o755);
        script(&dir.path().join("bin"), "plain", 0o644);
        let bin = dir.path().join("bin").into_os_string();
        // PATH passed through inherit_env (the default list has it).
        let c = load(dir.path(), "[servers.a]\ncommand = \"tool\"\n");
        assert!(c.check_commands(&|_| Some(bin.clone())).is_ok());
        // Not passed: the default search path, which does not hold it.
        let c = load(
            dir.path(),
            "[servers.a]\ncommand = \"tool\"\ninherit_env = []\n",
        );
        let e = c
            .check_commands(&|_| Some(bin.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the default search path"), "{e}");
        // An explicit env PATH wins, relative entries against the child's folder.
        let c = load(
            dir.path(),
            "[servers.a]\ncommand = \"tool\"\ninherit_env = []\nenv = { PATH = \"bin\" }\n",
        );
        assert!(c.check_commands(&|_| None).is_ok());
        // Found but not executable.
        let c = load(dir.path(), "[servers.a]\ncommand = \"plain\"\n");
        let e = c
            .check_commands(&|_| Some(bin.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`plain` is not executable"), "{e}");
    }
}
