//! `identity-directory`: an example upstream MCP server for `mcp-broker`.
//!
//! It models a small corporate identity directory (think a toy LDAP / IdP) held
//! in memory and seeded with a handful of fake employees. It exposes four tools:
//!
//! * `lookup_user`   – find one user by username or e-mail address (read-only)
//! * `list_users`    – list users, optionally filtered by department and/or status (read-only)
//! * `disable_user`  – disable an account, recording a reason (destructive, idempotent)
//! * `activate_user` – (re-)activate a disabled or pending account (idempotent)
//!
//! Unknown users, invalid state changes and malformed arguments are all
//! reported as tool errors (`isError: true`; rmcp turns argument
//! deserialization failures into tool errors). Only an unknown tool name is a
//! JSON-RPC error.
//!
//! # Running
//!
//! ```text
//! cargo run --example identity_directory                          # stdio (default)
//! cargo run --example identity_directory -- stdio
//! cargo run --example identity_directory -- http 127.0.0.1:8102   # Streamable HTTP at /mcp
//! cargo run --example identity_directory -- http                  # port 0: an ephemeral port
//! ```
//!
//! In `http` mode exactly one line, `listening on http://<addr>/mcp`, is printed
//! to stdout once the socket is bound. Logs always go to stderr (`RUST_LOG`
//! controls the level, default `info`). The process exits cleanly on Ctrl-C /
//! SIGTERM and, in stdio mode, when stdin reaches EOF.

mod common;

use std::{
    process::ExitCode,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use common::now_rfc3339;
use rmcp::{
    Json, ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    schemars::{self, JsonSchema},
    tool, tool_handler, tool_router,
};
use serde::{Deserialize, Serialize};

const SERVER_NAME: &str = "identity-directory";
const USAGE: &str = "usage: identity_directory [stdio | http [ADDR]]\n\n  \
    stdio        serve MCP over stdin/stdout (default)\n  \
    http [ADDR]  serve MCP Streamable HTTP at http://ADDR/mcp (default ADDR 127.0.0.1:0)";

// ---------------------------------------------------------------------------
// Data model
// ---------------------------------------------------------------------------

/// Lifecycle state of a directory account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum UserStatus {
    /// The account can sign in.
    Active,
    /// The account has been disabled and cannot sign in.
    Disabled,
    /// The account has been provisioned but not yet activated (e.g. a future hire).
    Pending,
}

impl UserStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Pending => "pending",
        }
    }
}

/// A directory user record.
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct User {
    /// Unique login name.
    username: String,
    /// Primary e-mail address (unique, case-insensitive).
    email: String,
    display_name: String,
    department: String,
    title: String,
    status: UserStatus,
    /// Username of the user's manager, if any.
    manager: Option<String>,
    /// Group memberships.
    groups: Vec<String>,
    mfa_enrolled: bool,
    /// RFC 3339 timestamp of account creation.
    created_at: String,
    /// RFC 3339 timestamp of the last successful sign-in, if any.
    last_login_at: Option<String>,
    /// Reason recorded with the most recent status change, if any.
    status_reason: Option<String>,
    /// RFC 3339 timestamp of the most recent status change, if any.
    status_changed_at: Option<String>,
}

/// A compact view of a user, as returned by `list_users`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct UserSummary {
    username: String,
    email: String,
    display_name: String,
    department: String,
    title: String,
    status: UserStatus,
}

impl From<&User> for UserSummary {
    fn from(u: &User) -> Self {
        Self {
            username: u.username.clone(),
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            department: u.department.clone(),
            title: u.title.clone(),
            status: u.status,
        }
    }
}

/// Shared, mutable directory state. Cloning shares the same underlying data.
#[derive(Debug, Clone)]
struct Directory {
    users: Arc<Mutex<Vec<User>>>,
}

impl Directory {
    fn seeded() -> Self {
        let mut users: Vec<User> = seed_users()
            .into_iter()
            .map(|u| User {
                username: u.username.to_owned(),
                email: format!(
                    "{}@acme-corp.example",
                    u.display_name.to_lowercase().replace(' ', ".")
                ),
                display_name: u.display_name.to_owned(),
                department: u.department.to_owned(),
                title: u.title.to_owned(),
                status: u.status,
                manager: u.manager.map(str::to_owned),
                groups: u.groups.iter().map(|g| (*g).to_owned()).collect(),
                mfa_enrolled: u.status == UserStatus::Active,
                created_at: u.created_at.to_owned(),
                last_login_at: u.last_login_at.map(str::to_owned),
                status_reason: u.status_reason.map(str::to_owned),
                status_changed_at: u
                    .status_reason
                    .map(|_| u.last_login_at.unwrap_or(u.created_at).to_owned()),
            })
            .collect();
        users.sort_by(|a, b| a.username.cmp(&b.username));
        Self {
            users: Arc::new(Mutex::new(users)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<User>> {
        // A panic while holding the lock cannot leave a user record half-written
        // in a way that matters for this example, so recover from poisoning.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct UserSeed {
    username: &'static str,
    display_name: &'static str,
    department: &'static str,
    title: &'static str,
    status: UserStatus,
    manager: Option<&'static str>,
    groups: &'static [&'static str],
    created_at: &'static str,
    last_login_at: Option<&'static str>,
    status_reason: Option<&'static str>,
}

#[rustfmt::skip]
fn seed_users() -> [UserSeed; 8] {
    use UserStatus::{Active, Disabled, Pending};
    [
        UserSeed { username: "mchen", display_name: "Michael Chen", department: "Engineering", title: "Engineering Manager", status: Active, manager: None, groups: &["engineering", "managers", "vpn-users"], created_at: "2019-04-01T09:00:00Z", last_login_at: Some("2025-06-02T08:41:17Z"), status_reason: None },
        UserSeed { username: "jdoe", display_name: "Jane Doe", department: "Engineering", title: "Staff Software Engineer", status: Active, manager: Some("mchen"), groups: &["engineering", "github-admins", "vpn-users"], created_at: "2020-02-17T09:00:00Z", last_login_at: Some("2025-06-02T07:58:03Z"), status_reason: None },
        UserSeed { username: "apatel", display_name: "Aisha Patel", department: "Finance", title: "Senior Accountant", status: Active, manager: Some("tkowalski"), groups: &["finance", "erp-users"], created_at: "2021-08-09T09:00:00Z", last_login_at: Some("2025-05-30T16:12:44Z"), status_reason: None },
        UserSeed { username: "tkowalski", display_name: "Tomasz Kowalski", department: "Finance", title: "Financial Controller", status: Active, manager: None, groups: &["finance", "erp-admins", "managers"], created_at: "2018-11-05T09:00:00Z", last_login_at: Some("2025-06-01T19:03:29Z"), status_reason: None },
        UserSeed { username: "lnguyen", display_name: "Linh Nguyen", department: "Security", title: "Security Analyst", status: Active, manager: None, groups: &["security", "siem-admins", "vpn-users"], created_at: "2022-01-10T09:00:00Z", last_login_at: Some("2025-06-02T06:30:55Z"), status_reason: None },
        UserSeed { username: "rgarcia", display_name: "Roberto Garcia", department: "Sales", title: "Account Executive", status: Disabled, manager: None, groups: &["sales", "crm-users"], created_at: "2020-07-20T09:00:00Z", last_login_at: Some("2025-01-31T17:45:10Z"), status_reason: Some("Left the company (last working day 2025-01-31)") },
        UserSeed { username: "bwright", display_name: "Ben Wright", department: "Engineering", title: "Site Reliability Engineer (contractor)", status: Disabled, manager: Some("mchen"), groups: &["engineering", "oncall"], created_at: "2024-03-04T09:00:00Z", last_login_at: Some("2025-03-28T22:10:00Z"), status_reason: Some("Contract ended 2025-03-31") },
        UserSeed { username: "sokafor", display_name: "Sarah Okafor", department: "People Operations", title: "HR Business Partner", status: Pending, manager: None, groups: &["people-ops"], created_at: "2025-05-26T09:00:00Z", last_login_at: None, status_reason: Some("New hire, start date 2025-06-16") },
    ]
}

// ---------------------------------------------------------------------------
// Tool parameters and results
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize, JsonSchema)]
struct LookupUserArgs {
    /// Exact username (login name), e.g. `jdoe`. Provide this or `email`.
    #[serde(default)]
    username: Option<String>,
    /// E-mail address (case-insensitive), e.g. `jane.doe@acme-corp.example`. Provide this or `username`.
    #[serde(default)]
    email: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ListUsersArgs {
    /// Only return users in this department (case-insensitive), e.g. `Engineering`.
    #[serde(default)]
    department: Option<String>,
    /// Only return users with this status.
    #[serde(default)]
    status: Option<UserStatus>,
}

#[derive(Debug, Serialize, JsonSchema)]
struct UserList {
    /// Number of users returned.
    count: usize,
    users: Vec<UserSummary>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct DisableUserArgs {
    /// Username of the account to disable.
    username: String,
    /// Why the account is being disabled (recorded on the account), e.g. `Offboarding`.
    reason: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ActivateUserArgs {
    /// Username of the account to activate.
    username: String,
}

#[derive(Debug, Serialize, JsonSchema)]
struct StatusChange {
    /// Whether the call changed anything (false if the user was already in the requested state).
    changed: bool,
    previous_status: UserStatus,
    /// The user record after the call.
    user: User,
}

// ---------------------------------------------------------------------------
// MCP server
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct IdentityDirectory {
    directory: Directory,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl IdentityDirectory {
    fn new(directory: Directory) -> Self {
        Self {
            directory,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Look up a single directory user by exact username or by e-mail address \
                       (case-insensitive). Returns the full user record including status, \
                       department, manager and group memberships.",
        annotations(title = "Look up user", read_only_hint = true, open_world_hint = false)
    )]
    async fn lookup_user(
        &self,
        Parameters(args): Parameters<LookupUserArgs>,
    ) -> Result<Json<User>, String> {
        let username = args
            .username
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let email = args
            .email
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let users = self.directory.lock();
        let found = match (username, email) {
            (None, None) => return Err("provide either `username` or `email`".to_owned()),
            (Some(username), None) => users.iter().find(|u| u.username == username),
            (None, Some(email)) => users.iter().find(|u| u.email.eq_ignore_ascii_case(email)),
            (Some(username), Some(email)) => users
                .iter()
                .find(|u| u.username == username && u.email.eq_ignore_ascii_case(email)),
        };
        match found {
            Some(user) => Ok(Json(user.clone())),
            None => Err(match (username, email) {
                (Some(u), Some(e)) => format!("no user with username '{u}' and email '{e}'"),
                (Some(u), None) => format!("no user with username '{u}'"),
                (_, Some(e)) => format!("no user with email '{e}'"),
                (None, None) => "no such user".to_owned(),
            }),
        }
    }

    #[tool(
        description = "List directory users, optionally filtered by department (case-insensitive \
                       exact match) and/or account status (active, disabled, pending). Returns \
                       a compact summary per user, sorted by username.",
        annotations(title = "List users", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_users(&self, Parameters(args): Parameters<ListUsersArgs>) -> Json<UserList> {
        let department = args
            .department
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let users: Vec<UserSummary> = self
            .directory
            .lock()
            .iter()
            .filter(|u| department.is_none_or(|d| u.department.eq_ignore_ascii_case(d)))
            .filter(|u| args.status.is_none_or(|s| u.status == s))
            .map(UserSummary::from)
            .collect();
        Json(UserList {
            count: users.len(),
            users,
        })
    }

    #[tool(
        description = "Disable a user account so it can no longer sign in. A non-empty reason is \
                       required and recorded on the account. Disabling an already-disabled \
                       account changes nothing (the original reason is kept).",
        annotations(
            title = "Disable user",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn disable_user(
        &self,
        Parameters(args): Parameters<DisableUserArgs>,
    ) -> Result<Json<StatusChange>, String> {
        let reason = args.reason.trim();
        if reason.is_empty() {
            return Err("`reason` must not be empty".to_owned());
        }
        self.set_status(&args.username, UserStatus::Disabled, reason)
    }

    #[tool(
        description = "Activate a user account that is disabled or pending, allowing it to sign \
                       in. Activating an already-active account changes nothing.",
        annotations(
            title = "Activate user",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn activate_user(
        &self,
        Parameters(args): Parameters<ActivateUserArgs>,
    ) -> Result<Json<StatusChange>, String> {
        self.set_status(
            &args.username,
            UserStatus::Active,
            "Activated via directory API",
        )
    }
}

impl IdentityDirectory {
    fn set_status(
        &self,
        username: &str,
        status: UserStatus,
        reason: &str,
    ) -> Result<Json<StatusChange>, String> {
        let username = username.trim();
        let mut users = self.directory.lock();
        let Some(user) = users.iter_mut().find(|u| u.username == username) else {
            return Err(format!("no user with username '{username}'"));
        };
        let previous_status = user.status;
        let changed = previous_status != status;
        if changed {
            user.status = status;
            user.status_reason = Some(reason.to_owned());
            user.status_changed_at = Some(now_rfc3339());
            tracing::info!(
                username,
                from = previous_status.as_str(),
                to = status.as_str(),
                reason,
                "user status changed"
            );
        }
        Ok(Json(StatusChange {
            changed,
            previous_status,
            user: user.clone(),
        }))
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "identity-directory",
    instructions = "Corporate identity directory. Use lookup_user / list_users to inspect \
                    accounts, disable_user (with a reason) to revoke sign-in, and \
                    activate_user to restore it."
)]
impl ServerHandler for IdentityDirectory {}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    common::main(SERVER_NAME, USAGE, || {
        IdentityDirectory::new(Directory::seeded())
    })
}
