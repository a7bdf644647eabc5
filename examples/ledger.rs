//! `ledger`: an example upstream MCP server for `mcp-broker`.
//!
//! It models a small enterprise banking ledger held in memory and seeded with
//! fake customers, accounts and transactions. It is deliberately a mix of
//! harmless reads, sensitive reads (customer PII) and destructive writes, so a
//! broker's policy features have something realistic to act on.
//!
//! Tools:
//!
//! * `list_accounts`         – list accounts, optionally filtered by status / customer (read-only)
//! * `get_account`           – one account with owner and activity summary (read-only)
//! * `list_transactions`     – recent transactions of an account, newest first (read-only)
//! * `update_account_status` – set an account to active / frozen / closed with a reason
//!   (destructive, idempotent; recorded in the audit log)
//! * `get_customer_pii`      – a customer's name, masked SSN, address and date of birth
//!   (read-only, sensitive)
//! * `get_audit_log`         – the ledger's own log of account status changes (read-only)
//! * `reconcile_ledger`      – a deliberately slow consistency check that reports
//!   `notifications/progress` per step and honours cancellation (read-only)
//!
//! Prompt: `summarize_account` (argument `account_id`).
//!
//! Resources: `ledger://policies/retention` (text) and the template
//! `ledger://accounts/{id}` (JSON), both readable with `resources/read`.
//!
//! Unknown ids, invalid state changes and malformed arguments are reported as
//! tool errors (`isError: true`; rmcp turns argument deserialization failures
//! into tool errors). Numeric limits (`limit`, `steps`, `step_ms`) are clamped
//! to their documented ranges rather than rejected. An unknown tool name, an
//! unknown prompt account and an unknown resource URI are JSON-RPC errors
//! (`invalid_params` / resource-not-found).
//!
//! # Running
//!
//! ```text
//! cargo run --example ledger                          # stdio (default)
//! cargo run --example ledger -- stdio
//! cargo run --example ledger -- http 127.0.0.1:8101   # Streamable HTTP at /mcp
//! cargo run --example ledger -- http                  # port 0: an ephemeral port
//! ```
//!
//! In `http` mode exactly one line, `listening on http://<addr>/mcp`, is printed
//! to stdout once the socket is bound. Logs always go to stderr (`RUST_LOG`
//! controls the level, default `info`). The process exits cleanly on Ctrl-C /
//! SIGTERM and, in stdio mode, when stdin reaches EOF.
//!
//! All people, numbers and addresses in here are fictitious.

mod common;

use std::{
    process::ExitCode,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use common::now_rfc3339;

use rmcp::{
    ErrorData as McpError, Json, Peer, RoleServer, ServerHandler,
    handler::server::{
        router::{prompt::PromptRouter, tool::ToolRouter},
        wrapper::Parameters,
    },
    model::{
        GetPromptResult, Implementation, ListResourceTemplatesResult, ListResourcesResult,
        PaginatedRequestParams, ProgressNotificationParam, PromptMessage,
        ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
        ResourceContents, ResourceTemplate, Role, ServerCapabilities, ServerConfig,
    },
    prompt, prompt_handler, prompt_router,
    schemars::{self, JsonSchema},
    service::RequestContext,
    tool, tool_handler, tool_router,
};
use serde::{Deserialize, Serialize};

const SERVER_NAME: &str = "ledger";
const USAGE: &str = "usage: ledger [stdio | http [ADDR]]\n\n  \
    stdio        serve MCP over stdin/stdout (default)\n  \
    http [ADDR]  serve MCP Streamable HTTP at http://ADDR/mcp (default ADDR 127.0.0.1:0)";

const RETENTION_POLICY_URI: &str = "ledger://policies/retention";
const ACCOUNT_URI_PREFIX: &str = "ledger://accounts/";
const RETENTION_POLICY: &str = "\
ACME Bank - Ledger Data Retention Policy (LDR-7, revision 2025-02)

1. Posted transactions are retained for 7 years after the end of the fiscal
   year in which they were posted, then purged in the next quarterly cycle.
2. Account records, including closed accounts, are retained for 7 years after
   the account is closed.
3. Account status changes (freeze, close, reactivate) and their stated reasons
   are written to the ledger audit log. Audit entries are immutable and are
   retained for 10 years.
4. Customer personally identifiable information (PII) is retained only while
   the customer holds an open account, plus 5 years. Social security numbers
   are never returned in full by any interface; only the last four digits.
5. Legal holds suspend all purges for the affected customer or account until
   released in writing by the Legal department.
";

const MAX_TXN_LIMIT: u32 = 100;
const MAX_AUDIT_LIMIT: u32 = 500;
const MAX_RECONCILE_STEPS: u32 = 50;
const MAX_RECONCILE_STEP_MS: u64 = 2000;

const RECONCILE_PHASES: [&str; 6] = [
    "snapshotting account balances",
    "loading posted transactions",
    "replaying transaction chains",
    "matching against the general ledger",
    "checking status holds",
    "writing reconciliation report",
];

// ---------------------------------------------------------------------------
// Data model
// ---------------------------------------------------------------------------

/// Account lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum AccountStatus {
    /// Open and transacting normally.
    Active,
    /// Open, but all debits and credits are blocked (e.g. fraud review, legal hold).
    Frozen,
    /// Permanently closed. A closed account cannot be reopened.
    Closed,
}

impl AccountStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Frozen => "frozen",
            Self::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum AccountType {
    Checking,
    Savings,
    MoneyMarket,
    BusinessChecking,
}

/// A ledger account.
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct Account {
    account_id: String,
    customer_id: String,
    account_type: AccountType,
    nickname: String,
    /// ISO 4217 currency code.
    currency: String,
    /// Current balance in minor units (cents).
    balance_cents: i64,
    /// Current balance as a decimal string, e.g. `"1234.56"`.
    balance: String,
    status: AccountStatus,
    /// Reason recorded with the most recent status change, if any.
    status_reason: Option<String>,
    /// RFC 3339 timestamp of the most recent status change, if any.
    status_changed_at: Option<String>,
    /// Date the account was opened (YYYY-MM-DD).
    opened_on: String,
    branch: String,
    /// Balance when the account was migrated onto this ledger (internal, for reconciliation).
    #[serde(skip)]
    opening_balance_cents: i64,
}

/// A posted ledger transaction.
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct Transaction {
    transaction_id: String,
    account_id: String,
    /// RFC 3339 posting timestamp.
    posted_at: String,
    description: String,
    counterparty: String,
    category: String,
    /// Signed amount in minor units: positive = credit, negative = debit.
    amount_cents: i64,
    /// Signed amount as a decimal string, e.g. `"-42.10"`.
    amount: String,
    /// Account balance immediately after this transaction, in minor units.
    balance_after_cents: i64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
struct Address {
    line1: String,
    line2: Option<String>,
    city: String,
    region: String,
    postal_code: String,
    country: String,
}

/// Customer personally identifiable information (fictitious).
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct Customer {
    customer_id: String,
    full_name: String,
    /// Social security number with all but the last four digits masked, e.g. `***-**-1234`.
    ssn_masked: String,
    /// Date of birth (YYYY-MM-DD).
    date_of_birth: String,
    address: Address,
    email: String,
    phone: String,
}

/// One entry of the ledger's audit log of account status changes.
#[derive(Debug, Clone, Serialize, JsonSchema)]
struct AuditEntry {
    /// Monotonically increasing sequence number.
    sequence: u64,
    /// RFC 3339 timestamp of the change.
    timestamp: String,
    /// Always `account_status_changed`.
    action: String,
    account_id: String,
    from_status: AccountStatus,
    to_status: AccountStatus,
    reason: String,
    /// Who made the change (for MCP calls: `mcp:<client name>`).
    actor: String,
}

#[derive(Debug)]
struct LedgerData {
    customers: Vec<Customer>,
    accounts: Vec<Account>,
    transactions: Vec<Transaction>,
    audit_log: Vec<AuditEntry>,
}

impl LedgerData {
    fn account(&self, account_id: &str) -> Result<&Account, String> {
        self.accounts
            .iter()
            .find(|a| a.account_id == account_id)
            .ok_or_else(|| format!("no account with id '{account_id}'"))
    }

    fn customer(&self, customer_id: &str) -> Result<&Customer, String> {
        self.customers
            .iter()
            .find(|c| c.customer_id == customer_id)
            .ok_or_else(|| format!("no customer with id '{customer_id}'"))
    }

    /// Transactions of one account, newest first.
    fn transactions_of(&self, account_id: &str) -> Vec<&Transaction> {
        let mut txns: Vec<&Transaction> = self
            .transactions
            .iter()
            .filter(|t| t.account_id == account_id)
            .collect();
        txns.sort_by(|a, b| b.posted_at.cmp(&a.posted_at));
        txns
    }

    fn account_detail(&self, account_id: &str) -> Result<AccountDetail, String> {
        let account = self.account(account_id)?.clone();
        let owner_name = self
            .customer(&account.customer_id)
            .map(|c| c.full_name.clone())
            .unwrap_or_default();
        let txns = self.transactions_of(account_id);
        Ok(AccountDetail {
            owner_name,
            transaction_count: txns.len(),
            last_transaction_at: txns.first().map(|t| t.posted_at.clone()),
            account,
        })
    }
}

/// Shared, mutable ledger state. Cloning shares the same underlying data.
#[derive(Debug, Clone)]
struct Ledger {
    data: Arc<Mutex<LedgerData>>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, LedgerData> {
        // Every mutation below is a single in-place assignment sequence that
        // cannot panic half-way, so recovering from poisoning is safe.
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seeded() -> Self {
        let customers: Vec<Customer> = seed_customers()
            .into_iter()
            .map(|c| Customer {
                customer_id: c.id.to_owned(),
                full_name: c.name.to_owned(),
                ssn_masked: format!("***-**-{}", c.ssn_last4),
                date_of_birth: c.dob.to_owned(),
                address: Address {
                    line1: c.line1.to_owned(),
                    line2: c.line2.map(str::to_owned),
                    city: c.city.to_owned(),
                    region: c.region.to_owned(),
                    postal_code: c.postal_code.to_owned(),
                    country: "US".to_owned(),
                },
                email: format!("{}@mail.example", c.name.to_lowercase().replace(' ', ".")),
                phone: c.phone.to_owned(),
            })
            .collect();

        let mut accounts = Vec::new();
        let mut transactions = Vec::new();
        let mut txn_seq = 0u32;
        for seed in seed_accounts() {
            let mut balance = seed.opening_cents;
            for &(posted_at, description, counterparty, category, amount) in seed.txns {
                txn_seq += 1;
                balance += amount;
                transactions.push(Transaction {
                    transaction_id: format!("TXN-{txn_seq:06}"),
                    account_id: seed.id.to_owned(),
                    posted_at: posted_at.to_owned(),
                    description: description.to_owned(),
                    counterparty: counterparty.to_owned(),
                    category: category.to_owned(),
                    amount_cents: amount,
                    amount: format_cents(amount),
                    balance_after_cents: balance,
                });
            }
            accounts.push(Account {
                account_id: seed.id.to_owned(),
                customer_id: seed.customer.to_owned(),
                account_type: seed.account_type,
                nickname: seed.nickname.to_owned(),
                currency: "USD".to_owned(),
                balance_cents: balance,
                balance: format_cents(balance),
                status: seed.status,
                status_reason: seed.status_reason.map(str::to_owned),
                status_changed_at: seed.status_changed_at.map(str::to_owned),
                opened_on: seed.opened_on.to_owned(),
                branch: seed.branch.to_owned(),
                opening_balance_cents: seed.opening_cents,
            });
        }

        let audit_log = vec![
            AuditEntry {
                sequence: 1,
                timestamp: "2025-04-18T14:05:00Z".to_owned(),
                action: "account_status_changed".to_owned(),
                account_id: "ACC-1006".to_owned(),
                from_status: AccountStatus::Active,
                to_status: AccountStatus::Closed,
                reason: "Customer request: funds moved to external brokerage".to_owned(),
                actor: "ops:kbrennan".to_owned(),
            },
            AuditEntry {
                sequence: 2,
                timestamp: "2025-05-28T16:40:00Z".to_owned(),
                action: "account_status_changed".to_owned(),
                account_id: "ACC-1004".to_owned(),
                from_status: AccountStatus::Active,
                to_status: AccountStatus::Frozen,
                reason: "Fraud review FR-2025-0419: unusual outbound wires".to_owned(),
                actor: "fraud-ops:mwallace".to_owned(),
            },
        ];

        Self {
            data: Arc::new(Mutex::new(LedgerData {
                customers,
                accounts,
                transactions,
                audit_log,
            })),
        }
    }
}

/// (posted_at, description, counterparty, category, signed amount in cents)
type TxnSeed = (&'static str, &'static str, &'static str, &'static str, i64);

struct AccountSeed {
    id: &'static str,
    customer: &'static str,
    account_type: AccountType,
    nickname: &'static str,
    opened_on: &'static str,
    branch: &'static str,
    opening_cents: i64,
    status: AccountStatus,
    status_reason: Option<&'static str>,
    status_changed_at: Option<&'static str>,
    txns: &'static [TxnSeed],
}

struct CustomerSeed {
    id: &'static str,
    name: &'static str,
    ssn_last4: &'static str,
    dob: &'static str,
    line1: &'static str,
    line2: Option<&'static str>,
    city: &'static str,
    region: &'static str,
    postal_code: &'static str,
    phone: &'static str,
}

#[rustfmt::skip]
fn seed_customers() -> [CustomerSeed; 5] {
    [
        CustomerSeed { id: "CUST-001", name: "Margaret Ellison", ssn_last4: "4821", dob: "1971-09-14", line1: "1420 Harbor View Dr", line2: Some("Apt 3B"), city: "Portland", region: "OR", postal_code: "97209", phone: "+1-503-555-0142" },
        CustomerSeed { id: "CUST-002", name: "Daniel Okoye", ssn_last4: "0937", dob: "1988-02-03", line1: "77 Birch Lane", line2: None, city: "Columbus", region: "OH", postal_code: "43215", phone: "+1-614-555-0199" },
        CustomerSeed { id: "CUST-003", name: "Priya Raman", ssn_last4: "5512", dob: "1993-12-22", line1: "2901 Cedar St", line2: Some("Unit 210"), city: "Austin", region: "TX", postal_code: "78705", phone: "+1-512-555-0167" },
        CustomerSeed { id: "CUST-004", name: "Hector Alvarez", ssn_last4: "7304", dob: "1965-06-30", line1: "8 Quarry Rd", line2: None, city: "Burlington", region: "VT", postal_code: "05401", phone: "+1-802-555-0110" },
        CustomerSeed { id: "CUST-005", name: "Emily Carter", ssn_last4: "2268", dob: "1982-04-11", line1: "410 Market St", line2: Some("Floor 2"), city: "Wilmington", region: "DE", postal_code: "19801", phone: "+1-302-555-0175" },
    ]
}

#[rustfmt::skip]
fn seed_accounts() -> [AccountSeed; 6] {
    use AccountStatus::{Active, Closed, Frozen};
    [
        AccountSeed {
            id: "ACC-1001", customer: "CUST-001", account_type: AccountType::Checking,
            nickname: "Everyday Checking", opened_on: "2016-05-02", branch: "Portland Pearl District",
            opening_cents: 412_530, status: Active, status_reason: None, status_changed_at: None,
            txns: &[
                ("2025-05-01T14:02:11Z", "Payroll deposit", "Cascade Health Partners", "income", 386_412),
                ("2025-05-02T09:15:40Z", "Rent May", "Harbor View Properties", "housing", -210_000),
                ("2025-05-06T18:44:03Z", "Groceries", "Green Basket Market", "groceries", -12_874),
                ("2025-05-12T07:30:00Z", "Electric utility autopay", "PGE Utility Co", "utilities", -9_431),
                ("2025-05-15T14:01:57Z", "Payroll deposit", "Cascade Health Partners", "income", 386_412),
                ("2025-05-20T12:12:12Z", "Transfer to savings", "ACC-1002", "transfer", -100_000),
            ],
        },
        AccountSeed {
            id: "ACC-1002", customer: "CUST-001", account_type: AccountType::Savings,
            nickname: "High-Yield Savings", opened_on: "2018-01-15", branch: "Portland Pearl District",
            opening_cents: 2_450_000, status: Active, status_reason: None, status_changed_at: None,
            txns: &[
                ("2025-04-30T23:59:59Z", "Interest credit", "ACME Bank", "interest", 8_166),
                ("2025-05-20T12:12:12Z", "Transfer from checking", "ACC-1001", "transfer", 100_000),
                ("2025-05-31T23:59:59Z", "Interest credit", "ACME Bank", "interest", 8_493),
            ],
        },
        AccountSeed {
            id: "ACC-1003", customer: "CUST-002", account_type: AccountType::Checking,
            nickname: "Student Checking", opened_on: "2021-09-01", branch: "Columbus Short North",
            opening_cents: 58_210, status: Active, status_reason: None, status_changed_at: None,
            txns: &[
                ("2025-05-03T11:20:45Z", "Card purchase", "Campus Books & Supply", "education", -8_950),
                ("2025-05-09T16:05:00Z", "Mobile check deposit", "O. Okoye", "deposit", 25_000),
                ("2025-05-17T20:31:19Z", "Streaming subscription", "Streamly Inc", "entertainment", -1_599),
                ("2025-05-23T08:45:10Z", "Card purchase", "QuickFuel #2231", "transport", -4_210),
            ],
        },
        AccountSeed {
            id: "ACC-1004", customer: "CUST-003", account_type: AccountType::Checking,
            nickname: "Premier Checking", opened_on: "2019-03-11", branch: "Austin Riverside",
            opening_cents: 1_204_400, status: Frozen,
            status_reason: Some("Fraud review FR-2025-0419: unusual outbound wires"),
            status_changed_at: Some("2025-05-28T16:40:00Z"),
            txns: &[
                ("2025-05-05T10:00:00Z", "Payroll deposit", "Lonestar Analytics LLC", "income", 512_300),
                ("2025-05-26T03:12:44Z", "Outbound wire", "Baltic Trade Holdings OU", "wire", -900_000),
                ("2025-05-27T03:14:02Z", "Outbound wire", "Baltic Trade Holdings OU", "wire", -650_000),
            ],
        },
        AccountSeed {
            id: "ACC-1005", customer: "CUST-004", account_type: AccountType::BusinessChecking,
            nickname: "Alvarez Stoneworks Operating", opened_on: "2012-07-23", branch: "Burlington Church St",
            opening_cents: 8_732_015, status: Active, status_reason: None, status_changed_at: None,
            txns: &[
                ("2025-05-02T15:30:00Z", "Customer payment INV-3381", "Lakeside Builders Inc", "receivables", 1_845_000),
                ("2025-05-07T09:00:00Z", "Payroll batch", "Green Mountain Payroll Svc", "payroll", -2_210_450),
                ("2025-05-14T13:22:31Z", "Equipment lease", "Granite Equipment Finance", "lease", -385_000),
                ("2025-05-21T10:10:10Z", "Customer payment INV-3390", "Champlain Homes", "receivables", 962_500),
                ("2025-05-30T17:00:00Z", "Quarterly tax payment", "US Treasury EFTPS", "taxes", -1_400_000),
            ],
        },
        AccountSeed {
            id: "ACC-1006", customer: "CUST-005", account_type: AccountType::MoneyMarket,
            nickname: "Money Market", opened_on: "2020-10-05", branch: "Wilmington Rodney Sq",
            opening_cents: 1_530_077, status: Closed,
            status_reason: Some("Customer request: funds moved to external brokerage"),
            status_changed_at: Some("2025-04-18T14:05:00Z"),
            txns: &[
                ("2025-04-15T10:00:00Z", "Interest credit", "ACME Bank", "interest", 3_923),
                ("2025-04-18T13:55:00Z", "Closing transfer", "Brightline Brokerage", "transfer", -1_534_000),
            ],
        },
    ]
}

// ---------------------------------------------------------------------------
// Tool / prompt parameters and results
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize, JsonSchema)]
struct ListAccountsArgs {
    /// Only return accounts with this status.
    #[serde(default)]
    status: Option<AccountStatus>,
    /// Only return accounts owned by this customer, e.g. `CUST-001`.
    #[serde(default)]
    customer_id: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
struct AccountList {
    /// Number of accounts returned.
    count: usize,
    accounts: Vec<Account>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct AccountIdArgs {
    /// Account id, e.g. `ACC-1001`.
    account_id: String,
}

#[derive(Debug, Serialize, JsonSchema)]
struct AccountDetail {
    account: Account,
    /// Full name of the account owner.
    owner_name: String,
    /// Number of posted transactions on the account.
    transaction_count: usize,
    /// Posting time of the most recent transaction, if any.
    last_transaction_at: Option<String>,
}

fn default_txn_limit() -> u32 {
    20
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ListTransactionsArgs {
    /// Account id, e.g. `ACC-1001`.
    account_id: String,
    /// Maximum number of transactions to return, newest first (default 20; clamped to 1-100).
    #[serde(default = "default_txn_limit")]
    limit: u32,
}

#[derive(Debug, Serialize, JsonSchema)]
struct TransactionList {
    account_id: String,
    /// Number of transactions returned.
    count: usize,
    /// Number of transactions on the account in total.
    total: usize,
    /// Newest first.
    transactions: Vec<Transaction>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct UpdateAccountStatusArgs {
    /// Account id, e.g. `ACC-1001`.
    account_id: String,
    /// New status.
    status: AccountStatus,
    /// Why the status is changing (recorded in the audit log), e.g. `Customer reported card stolen`.
    reason: String,
}

#[derive(Debug, Serialize, JsonSchema)]
struct StatusUpdate {
    /// Whether the call changed anything (false if the account already had the requested status).
    changed: bool,
    previous_status: AccountStatus,
    /// The account after the call.
    account: Account,
    /// The audit log entry written for this change (absent when nothing changed).
    audit_entry: Option<AuditEntry>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct CustomerIdArgs {
    /// Customer id, e.g. `CUST-001`.
    customer_id: String,
}

fn default_audit_limit() -> u32 {
    50
}

#[derive(Debug, Deserialize, JsonSchema)]
struct AuditLogArgs {
    /// Only return entries for this account.
    #[serde(default)]
    account_id: Option<String>,
    /// Maximum number of entries to return, newest first (default 50; clamped to 1-500).
    #[serde(default = "default_audit_limit")]
    limit: u32,
}

#[derive(Debug, Serialize, JsonSchema)]
struct AuditLog {
    /// Number of entries returned.
    count: usize,
    /// Newest first.
    entries: Vec<AuditEntry>,
}

fn default_steps() -> u32 {
    5
}

fn default_step_ms() -> u64 {
    100
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ReconcileArgs {
    /// Number of reconciliation steps (default 5; clamped to 1-50). One progress notification per step.
    #[serde(default = "default_steps")]
    steps: u32,
    /// Simulated duration of each step in milliseconds (default 100; clamped to 0-2000).
    #[serde(default = "default_step_ms")]
    step_ms: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
struct Discrepancy {
    account_id: String,
    /// What the transaction history says the balance should be, in minor units.
    expected_balance_cents: i64,
    /// The balance recorded on the account, in minor units.
    ledger_balance_cents: i64,
    detail: String,
}

#[derive(Debug, Serialize, JsonSchema)]
struct ReconcileSummary {
    /// `balanced` or `discrepancies_found`.
    outcome: String,
    steps_completed: u32,
    /// Effective per-step duration in milliseconds (after clamping).
    step_ms: u64,
    accounts_checked: usize,
    transactions_checked: usize,
    discrepancies: Vec<Discrepancy>,
    /// Whether progress notifications were sent (only when the request carried a progress token).
    progress_reported: bool,
    started_at: String,
    finished_at: String,
    elapsed_ms: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct SummarizeAccountArgs {
    /// Account id to summarize, e.g. `ACC-1001`.
    account_id: String,
}

// ---------------------------------------------------------------------------
// MCP server
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct LedgerServer {
    ledger: Ledger,
    tool_router: ToolRouter<Self>,
    prompt_router: PromptRouter<Self>,
}

#[tool_router]
impl LedgerServer {
    fn new(ledger: Ledger) -> Self {
        Self {
            ledger,
            tool_router: Self::tool_router(),
            prompt_router: Self::prompt_router(),
        }
    }

    #[tool(
        description = "List ledger accounts with balances and status, optionally filtered by \
                       status (active, frozen, closed) and/or owning customer id.",
        annotations(
            title = "List accounts",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_accounts(
        &self,
        Parameters(args): Parameters<ListAccountsArgs>,
    ) -> Json<AccountList> {
        let customer = args.customer_id.as_deref().map(str::trim);
        let accounts: Vec<Account> = self
            .ledger
            .lock()
            .accounts
            .iter()
            .filter(|a| args.status.is_none_or(|s| a.status == s))
            .filter(|a| customer.is_none_or(|c| a.customer_id == c))
            .cloned()
            .collect();
        Json(AccountList {
            count: accounts.len(),
            accounts,
        })
    }

    #[tool(
        description = "Get one ledger account by id: type, balance, status (with the reason for \
                       the last status change), owner name and transaction activity summary.",
        annotations(title = "Get account", read_only_hint = true, open_world_hint = false)
    )]
    async fn get_account(
        &self,
        Parameters(args): Parameters<AccountIdArgs>,
    ) -> Result<Json<AccountDetail>, String> {
        self.ledger
            .lock()
            .account_detail(args.account_id.trim())
            .map(Json)
    }

    #[tool(
        description = "List the posted transactions of an account, newest first. Amounts are \
                       signed minor units (cents): positive = credit, negative = debit.",
        annotations(
            title = "List transactions",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_transactions(
        &self,
        Parameters(args): Parameters<ListTransactionsArgs>,
    ) -> Result<Json<TransactionList>, String> {
        let limit = args.limit.clamp(1, MAX_TXN_LIMIT) as usize;
        let data = self.ledger.lock();
        let account_id = args.account_id.trim();
        data.account(account_id)?;
        let all = data.transactions_of(account_id);
        let transactions: Vec<Transaction> = all.iter().take(limit).map(|t| (*t).clone()).collect();
        Ok(Json(TransactionList {
            account_id: account_id.to_owned(),
            count: transactions.len(),
            total: all.len(),
            transactions,
        }))
    }

    #[tool(
        description = "Change an account's status to active, frozen or closed. Freezing blocks \
                       all movement of funds; closing is permanent (a closed account cannot be \
                       reopened). A non-empty reason is required and the change is written to \
                       the audit log. Setting the status the account already has changes nothing.",
        annotations(
            title = "Update account status",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn update_account_status(
        &self,
        Parameters(args): Parameters<UpdateAccountStatusArgs>,
        peer: Peer<RoleServer>,
    ) -> Result<Json<StatusUpdate>, String> {
        let reason = args.reason.trim();
        if reason.is_empty() {
            return Err("`reason` must not be empty".to_owned());
        }
        let actor = peer.peer_info().map_or_else(
            || "mcp:unknown-client".to_owned(),
            |info| format!("mcp:{}", info.client_info.name),
        );
        let account_id = args.account_id.trim();

        let mut data = self.ledger.lock();
        let next_sequence = data.audit_log.last().map_or(1, |e| e.sequence + 1);
        let Some(account) = data
            .accounts
            .iter_mut()
            .find(|a| a.account_id == account_id)
        else {
            return Err(format!("no account with id '{account_id}'"));
        };
        let previous_status = account.status;
        if previous_status == args.status {
            return Ok(Json(StatusUpdate {
                changed: false,
                previous_status,
                account: account.clone(),
                audit_entry: None,
            }));
        }
        if previous_status == AccountStatus::Closed {
            return Err(format!(
                "account '{account_id}' is closed; closed accounts cannot be reopened or frozen"
            ));
        }
        let timestamp = now_rfc3339();
        account.status = args.status;
        account.status_reason = Some(reason.to_owned());
        account.status_changed_at = Some(timestamp.clone());
        let account = account.clone();
        let entry = AuditEntry {
            sequence: next_sequence,
            timestamp,
            action: "account_status_changed".to_owned(),
            account_id: account_id.to_owned(),
            from_status: previous_status,
            to_status: args.status,
            reason: reason.to_owned(),
            actor,
        };
        data.audit_log.push(entry.clone());
        tracing::info!(
            account_id,
            from = previous_status.as_str(),
            to = args.status.as_str(),
            reason,
            actor = %entry.actor,
            "account status changed"
        );
        Ok(Json(StatusUpdate {
            changed: true,
            previous_status,
            account,
            audit_entry: Some(entry),
        }))
    }

    #[tool(
        description = "Get a customer's personally identifiable information: full name, masked \
                       social security number (last four digits only), date of birth, postal \
                       address, e-mail and phone. Sensitive: only use when the task requires it.",
        annotations(
            title = "Get customer PII",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_customer_pii(
        &self,
        Parameters(args): Parameters<CustomerIdArgs>,
    ) -> Result<Json<Customer>, String> {
        let customer_id = args.customer_id.trim();
        let customer = self.ledger.lock().customer(customer_id)?.clone();
        tracing::info!(customer_id, "customer PII read");
        Ok(Json(customer))
    }

    #[tool(
        description = "Read the ledger's audit log of account status changes (freeze, close, \
                       reactivate), newest first, optionally for a single account.",
        annotations(
            title = "Get audit log",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_audit_log(
        &self,
        Parameters(args): Parameters<AuditLogArgs>,
    ) -> Result<Json<AuditLog>, String> {
        let limit = args.limit.clamp(1, MAX_AUDIT_LIMIT) as usize;
        let data = self.ledger.lock();
        let account_id = args.account_id.as_deref().map(str::trim);
        if let Some(id) = account_id {
            data.account(id)?;
        }
        let entries: Vec<AuditEntry> = data
            .audit_log
            .iter()
            .rev()
            .filter(|e| account_id.is_none_or(|id| e.account_id == id))
            .take(limit)
            .cloned()
            .collect();
        Ok(Json(AuditLog {
            count: entries.len(),
            entries,
        }))
    }

    #[tool(
        description = "Run a ledger reconciliation: replays every account's transaction history \
                       and compares it with the recorded balance. Deliberately slow: runs `steps` \
                       steps (default 5, at most 50) of `step_ms` milliseconds each (default 100, \
                       at most 2000; larger values are clamped), sending a notifications/progress \
                       message per step when the request carries a progress token. Can be \
                       cancelled with notifications/cancelled.",
        annotations(
            title = "Reconcile ledger",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn reconcile_ledger(
        &self,
        Parameters(args): Parameters<ReconcileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ReconcileSummary>, String> {
        let steps = args.steps.clamp(1, MAX_RECONCILE_STEPS);
        let step_ms = args.step_ms.min(MAX_RECONCILE_STEP_MS);
        let started = Instant::now();
        let started_at = now_rfc3339();
        let progress_token = ctx.meta.get_progress_token();

        // Take the snapshot up front; the lock is never held across an await.
        let (accounts_checked, transactions_checked, discrepancies) = {
            let data = self.ledger.lock();
            let mut discrepancies = Vec::new();
            for account in &data.accounts {
                let mut expected = account.opening_balance_cents;
                let mut txns: Vec<&Transaction> = data
                    .transactions
                    .iter()
                    .filter(|t| t.account_id == account.account_id)
                    .collect();
                txns.sort_by(|a, b| a.posted_at.cmp(&b.posted_at));
                for txn in txns {
                    expected += txn.amount_cents;
                    if txn.balance_after_cents != expected {
                        discrepancies.push(Discrepancy {
                            account_id: account.account_id.clone(),
                            expected_balance_cents: expected,
                            ledger_balance_cents: txn.balance_after_cents,
                            detail: format!("running balance mismatch at {}", txn.transaction_id),
                        });
                    }
                }
                if account.balance_cents != expected {
                    discrepancies.push(Discrepancy {
                        account_id: account.account_id.clone(),
                        expected_balance_cents: expected,
                        ledger_balance_cents: account.balance_cents,
                        detail: "account balance does not match transaction history".to_owned(),
                    });
                }
            }
            (data.accounts.len(), data.transactions.len(), discrepancies)
        };

        let step_duration = Duration::from_millis(step_ms);
        for step in 1..=steps {
            tokio::select! {
                () = ctx.ct.cancelled() => {
                    let completed = step - 1;
                    tracing::info!(completed, total = steps, "reconciliation cancelled");
                    return Err(format!(
                        "reconciliation cancelled after {} of {} steps",
                        step - 1,
                        steps
                    ));
                }
                () = tokio::time::sleep(step_duration) => {}
            }
            if let Some(token) = &progress_token {
                let phase = RECONCILE_PHASES[(step as usize - 1) % RECONCILE_PHASES.len()];
                let param = ProgressNotificationParam::new(token.clone(), f64::from(step))
                    .with_total(f64::from(steps))
                    .with_message(format!("step {step}/{steps}: {phase}"));
                if let Err(err) = ctx.peer.notify_progress(param).await {
                    tracing::debug!("failed to send progress notification: {err}");
                }
            }
        }

        let outcome = if discrepancies.is_empty() {
            "balanced"
        } else {
            "discrepancies_found"
        };
        Ok(Json(ReconcileSummary {
            outcome: outcome.to_owned(),
            steps_completed: steps,
            step_ms,
            accounts_checked,
            transactions_checked,
            discrepancies,
            progress_reported: progress_token.is_some(),
            started_at,
            finished_at: now_rfc3339(),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

#[prompt_router]
impl LedgerServer {
    #[prompt(
        name = "summarize_account",
        description = "Summarize a ledger account: balance, status, recent activity and anything \
                       that looks unusual."
    )]
    async fn summarize_account(
        &self,
        Parameters(args): Parameters<SummarizeAccountArgs>,
    ) -> Result<GetPromptResult, McpError> {
        let account_id = args.account_id.trim();
        let (detail, recent) = {
            let data = self.ledger.lock();
            let detail = data
                .account_detail(account_id)
                .map_err(|msg| McpError::invalid_params(msg, None))?;
            let recent: Vec<Transaction> = data
                .transactions_of(account_id)
                .into_iter()
                .take(10)
                .cloned()
                .collect();
            (detail, recent)
        };
        let detail_json = serde_json::to_string_pretty(&detail)
            .map_err(|err| McpError::internal_error(err.to_string(), None))?;
        let recent_json = serde_json::to_string_pretty(&recent)
            .map_err(|err| McpError::internal_error(err.to_string(), None))?;
        let text = format!(
            "You are reviewing ledger account {account_id}. Write a short summary for a \
             relationship manager covering: current balance and status (with the reason if it \
             is not active), the owner, notable inflows and outflows in the recent activity, \
             and anything that looks unusual or warrants follow-up. Amounts are in cents.\n\n\
             Account:\n{detail_json}\n\nMost recent transactions (newest first):\n{recent_json}"
        );
        Ok(
            GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)])
                .with_description(format!("Summary of ledger account {account_id}")),
        )
    }
}

#[tool_handler(router = self.tool_router)]
#[prompt_handler(router = self.prompt_router)]
impl ServerHandler for LedgerServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new(SERVER_NAME, env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Enterprise banking ledger. Read accounts, transactions and the audit log freely; \
             get_customer_pii returns sensitive data; update_account_status freezes, closes or \
             reactivates accounts and is audited. Resources: ledger://policies/retention and \
             ledger://accounts/{id}.",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(RETENTION_POLICY_URI, "retention-policy")
                .with_title("Ledger data retention policy")
                .with_description(
                    "How long transactions, accounts, audit entries and PII are kept.",
                )
                .with_mime_type("text/plain"),
        ]))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("ledger://accounts/{id}", "account")
                .with_title("Ledger account")
                .with_description(
                    "An account record with owner and activity summary, e.g. ledger://accounts/ACC-1001.",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let uri = request.uri.as_str();
        if uri == RETENTION_POLICY_URI {
            let contents = ResourceContents::text(RETENTION_POLICY, uri);
            return Ok(ReadResourceResult::new(vec![contents]).into());
        }
        let not_found = || {
            McpError::resource_not_found(
                format!("resource not found: {uri}"),
                Some(serde_json::json!({ "uri": uri })),
            )
        };
        let account_id = uri
            .strip_prefix(ACCOUNT_URI_PREFIX)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(not_found)?;
        let detail = self
            .ledger
            .lock()
            .account_detail(account_id)
            .map_err(|_| not_found())?;
        let json = serde_json::to_string_pretty(&detail)
            .map_err(|err| McpError::internal_error(err.to_string(), None))?;
        let contents = ResourceContents::text(json, uri).with_mime_type("application/json");
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    common::main(SERVER_NAME, USAGE, || LedgerServer::new(Ledger::seeded()))
}

/// Format signed minor units as a decimal string, e.g. `-1234` -> `"-12.34"`.
fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}
