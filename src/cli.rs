//! The command line (SPEC §4): argument definitions, the offline key commands (working on
//! the store directly), and rendering of their answers for people or as JSON.
//!
//! Every command answers with the same `serde_json::Value` the admin API would (built by
//! `keygate::manage`); renderers take that value, so the same output code will serve when
//! the CLI talks to a running gateway's admin API instead of the store.
//!
//! Output rules: results go to stdout, errors and prompts to stderr. A secret is printed
//! only in the create/rotate answer. Exit codes: 0 ok, 1 error, 2 usage error.

use std::fmt::Display;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use http::Method;
use keygate::admin_client::AdminClient;
use keygate::audit::{Actor, AuditEvent};
use keygate::config::{Config, ConfigError};
use keygate::error::GatewayError;
use keygate::keys::{Role, SecretHasher};
use keygate::manage::{KeyManager, KeySpec, ListFilter, ManageError, VerifyRequest};
use keygate::store::{Store, StoreError};
use keygate::units::parse_duration;
use keygate::usage::{Usage, UsageReader};

/// keygate: a reverse-proxy authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, propagate_version = true)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        display_order = 100,
        value_name = "PATH",
        env = "KEYGATE_CONFIG",
        default_value = "gateway.toml"
    )]
    pub config: PathBuf,
    /// A file holding an admin key, for managing keys through a running gateway's admin API
    /// (the key may also come from KEYGATE_ADMIN_KEY).
    #[arg(long, global = true, display_order = 101, value_name = "PATH")]
    pub admin_key_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
// Parsed once per process: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the configuration file (exit 1 with file:line:col and the reason).
    Check,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show a key's usage: per-day bars, by operation, by deployment.
    Usage(UsageArgs),
    /// Show the audit trail, newest first.
    Audit(AuditArgs),
}

/// `keygate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (asks for a name on a terminal when --name is missing).
    Create(CreateArgs),
    /// List keys.
    List(ListArgs),
    /// Show one key.
    Show(ShowArgs),
    /// Change a key's name, description, owner, role, scopes, deployments, expiry or limit.
    Update(UpdateArgs),
    /// Issue a new secret for a key (same id and metadata).
    #[command(visible_alias = "regenerate")]
    Rotate(RotateArgs),
    /// Revoke a key for good (it stays listed, with its usage and audit trail).
    Revoke(RevokeArgs),
    /// Delete a key and its usage history (its audit entries stay).
    Delete(DeleteArgs),
    /// Check a secret as the gateway would (exit 0 when valid, 1 when not).
    Verify(VerifyArgs),
}

/// The key fields shared by `create` and `update`.
#[derive(Debug, Clone, Default, Args)]
pub struct KeyOptions {
    /// Name (required; asked for on a terminal when creating).
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Free-text description.
    #[arg(long, value_name = "D")]
    pub description: Option<String>,
    /// Owner (a person or team).
    #[arg(long, value_name = "O")]
    pub owner: Option<String>,
    /// Role [create default: operator].
    #[arg(long, value_parser = ["admin", "operator", "viewer"])]
    pub role: Option<String>,
    /// Scopes, comma-separated (an empty value clears them on update).
    #[arg(long, value_name = "a,b", value_delimiter = ',')]
    pub scopes: Option<Vec<String>>,
    /// Deployments, comma-separated, or * for all [create default: *].
    #[arg(long, value_name = "x,y|*", value_delimiter = ',')]
    pub deployments: Option<Vec<String>>,
    /// Environment, one of the configured ones (create only) [default: prod, else the first].
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Expiry: a duration such as 90d or 1y, an RFC 3339 time, or never.
    #[arg(long, value_name = "90d|never|RFC3339")]
    pub expires: Option<String>,
    /// Rate limit such as 1000/1h, none (unlimited), or default (the role's or gateway's).
    #[arg(long, value_name = "N/DURATION")]
    pub rate_limit: Option<String>,
}

/// `keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub opts: KeyOptions,
    /// Print the admin API's JSON answer (`{"key": …, "secret": …}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Which keys.
    #[arg(long, default_value = "active", value_parser = ["active", "expired", "revoked", "all"])]
    pub status: String,
    /// Only keys with this owner.
    #[arg(long, value_name = "O")]
    pub owner: Option<String>,
    /// Add the KEY column (the masked form, e.g. kg_prod_****…ab12; secrets are never stored).
    #[arg(long)]
    pub show_keys: bool,
    /// Print the admin API's JSON answer (`{"keys": […]}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Key id (key_…).
    pub id: String,
    /// Print JSON (`{"key": …}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Key id (key_…).
    pub id: String,
    #[command(flatten)]
    pub opts: KeyOptions,
    /// Print JSON (`{"key": …}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Key id (key_…).
    pub id: String,
    /// Keep the old secret working this long (e.g. 1h); default: it stops at once.
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub force: bool,
    /// Print JSON (`{"key": …, "secret": …}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Key id (key_…).
    pub id: String,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub force: bool,
    /// Print JSON (`{"key": …}`).
    #[arg(long)]
    pub json: bool,
}

/// `keys delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Key id (key_…).
    pub id: String,
    /// Do not ask to type the key's name.
    #[arg(long, short)]
    pub force: bool,
}

/// `keys verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The secret to check, or - to read it from stdin (keeps it out of shell history).
    pub secret: String,
    /// Check access to this deployment.
    #[arg(long, value_name = "D")]
    pub deployment: Option<String>,
    /// Check this method [default: GET].
    #[arg(long, value_name = "M")]
    pub method: Option<String>,
    /// Check this request path (routing and route scopes).
    #[arg(long, value_name = "P")]
    pub path: Option<String>,
    /// Require this scope.
    #[arg(long, value_name = "S")]
    pub scope: Option<String>,
    /// Print JSON (`{"valid", "code", "key"}`).
    #[arg(long)]
    pub json: bool,
}

/// `usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Key id (key_…).
    pub id: String,
    /// How many days back, today included.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=366))]
    pub days: u32,
    /// Print JSON (the admin API's usage answer).
    #[arg(long)]
    pub json: bool,
}

/// `audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// How many events, newest first.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// Print JSON (`{"events": […]}`).
    #[arg(long)]
    pub json: bool,
}

/// Why a command did not succeed: the exit code and what to print on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Process exit code (1 error, 2 usage error).
    pub code: u8,
    /// The full stderr text, or `None` when the command already said everything.
    pub message: Option<String>,
}

impl Failure {
    /// A runtime error: `error: …`, exit 1.
    pub fn error(message: impl Display) -> Self {
        Failure {
            code: 1,
            message: Some(format!("error: {message}")),
        }
    }

    /// A usage error: `error: …`, exit 2.
    pub fn usage(message: impl Display) -> Self {
        Failure {
            code: 2,
            message: Some(format!(
                "error: {message}\n\nFor more information, try '--help'."
            )),
        }
    }

    /// Exit with `code`, printing nothing more.
    pub fn silent(code: u8) -> Self {
        Failure {
            code,
            message: None,
        }
    }

    /// A configuration error, printed as `file:line:col: reason`.
    pub fn config(path: &Path, e: &ConfigError) -> Self {
        let mut text = if e.line == 0 {
            format!("{}: {}", e.file, e.message)
        } else {
            e.to_string()
        };
        if !path.exists() {
            text.push_str("\nhint: pass --config PATH or set KEYGATE_CONFIG");
        }
        Failure {
            code: 1,
            message: Some(text),
        }
    }
}

/// Result of a command.
pub type Outcome = Result<(), Failure>;

/// Runs a parsed command line. `serve` receives the loaded configuration and runs the
/// gateway (main owns the async runtime).
pub fn run(cli: Cli, serve: impl FnOnce(Config) -> Outcome) -> Outcome {
    match cli.command {
        Command::Serve => serve(load_config(&cli.config)?),
        Command::Check => check(&cli.config),
        Command::Keys(cmd) => {
            let ctx = Ctx::open(&cli.config, cli.admin_key_file.as_deref())?;
            ctx.keys(cmd)
        }
        Command::Usage(args) => Ctx::open(&cli.config, cli.admin_key_file.as_deref())?.usage(&args),
        Command::Audit(args) => Ctx::open(&cli.config, cli.admin_key_file.as_deref())?.audit(&args),
    }
}

/// Loads the configuration, or a [`Failure`] printing `file:line:col: reason`.
pub fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure::config(path, &e))
}

fn check(path: &Path) -> Outcome {
    let config = load_config(path)?;
    emit(&format!(
        "{}: OK ({})\n",
        path.display(),
        plural(config.deployments.len() as u64, "deployment")
    ))
}

/// `1 deployment`, `2 deployments`.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

// ---------------------------------------------------------------------------------------
// Commands on the store

/// Where key commands are carried out: the store itself, or — while a gateway holds the
/// store — that gateway's admin API. Both answer with the same JSON.
enum Backend {
    /// Direct access to the store.
    Local {
        /// Key management without a live index.
        manager: KeyManager,
        /// Usage reports.
        usage: Arc<Usage>,
    },
    /// Through the running gateway.
    Remote(AdminClient),
}

/// Query-string encoding of a value (RFC 3986 unreserved characters kept).
fn encode_query(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Backend {
    /// Calls the admin API and turns an error answer into a [`Failure`].
    fn remote(
        client: &AdminClient,
        method: Method,
        path: &str,
        body: Option<&Value>,
        id: Option<&str>,
    ) -> Result<Value, Failure> {
        let (status, answer) = client.call(method, path, body).map_err(Failure::error)?;
        if status.is_success() {
            return Ok(answer);
        }
        let code = answer["error"]["code"].as_str().unwrap_or_default();
        let message = answer["error"]["message"].as_str().map_or_else(
            || format!("the admin API answered {status}"),
            str::to_string,
        );
        Err(match (code, id) {
            ("key_not_found", Some(id)) => Failure::error(format!("no key with id {id}")),
            ("missing_key" | "invalid_key" | "key_expired", _) => {
                Failure::error(format!("the admin API refused the admin key: {message}"))
            }
            _ => Failure::error(message),
        })
    }

    fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, Failure> {
        serde_json::to_value(v).map_err(Failure::error)
    }

    fn create(&self, config: &Config, spec: &KeySpec, actor: &Actor) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .create(config, spec, actor)
                .map_err(|e| manage_failure(e, None)),
            Backend::Remote(c) => Self::remote(
                c,
                Method::POST,
                "/v1/keys",
                Some(&Self::to_json(spec)?),
                None,
            ),
        }
    }

    fn list(&self, filter: &ListFilter) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => {
                manager.list(filter).map_err(|e| manage_failure(e, None))
            }
            Backend::Remote(c) => {
                let mut path = format!(
                    "/v1/keys?status={}",
                    encode_query(filter.status.as_deref().unwrap_or("active"))
                );
                if let Some(o) = &filter.owner {
                    path.push_str(&format!("&owner={}", encode_query(o)));
                }
                if let Some(q) = &filter.q {
                    path.push_str(&format!("&q={}", encode_query(q)));
                }
                Self::remote(c, Method::GET, &path, None, None)
            }
        }
    }

    /// `{"key": …, "usage": …}` like `GET /v1/keys/{id}`.
    fn show(&self, id: &str) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, usage } => {
                let mut answer = manager.show(id).map_err(|e| manage_failure(e, Some(id)))?;
                answer["usage"] = usage.summary(id).map_err(Failure::error)?;
                Ok(answer)
            }
            Backend::Remote(c) => Self::remote(
                c,
                Method::GET,
                &format!("/v1/keys/{}", encode_query(id)),
                None,
                Some(id),
            ),
        }
    }

    fn update(
        &self,
        config: &Config,
        id: &str,
        spec: &KeySpec,
        actor: &Actor,
    ) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .update(config, id, spec, actor)
                .map_err(|e| manage_failure(e, Some(id))),
            Backend::Remote(c) => Self::remote(
                c,
                Method::PATCH,
                &format!("/v1/keys/{}", encode_query(id)),
                Some(&Self::to_json(spec)?),
                Some(id),
            ),
        }
    }

    fn rotate(
        &self,
        config: &Config,
        id: &str,
        grace: Option<&str>,
        actor: &Actor,
    ) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .rotate(config, id, grace, actor)
                .map_err(|e| manage_failure(e, Some(id))),
            Backend::Remote(c) => {
                let body = json!({ "grace": grace });
                Self::remote(
                    c,
                    Method::POST,
                    &format!("/v1/keys/{}/rotate", encode_query(id)),
                    Some(&body),
                    Some(id),
                )
            }
        }
    }

    fn revoke(&self, id: &str, actor: &Actor) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .revoke(id, actor)
                .map_err(|e| manage_failure(e, Some(id))),
            Backend::Remote(c) => Self::remote(
                c,
                Method::POST,
                &format!("/v1/keys/{}/revoke", encode_query(id)),
                None,
                Some(id),
            ),
        }
    }

    /// Deletes the key and its usage (the manager drops usage with the key).
    fn delete(&self, id: &str, actor: &Actor) -> Result<(), Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .delete(id, actor)
                .map(|_| ())
                .map_err(|e| manage_failure(e, Some(id))),
            Backend::Remote(c) => Self::remote(
                c,
                Method::DELETE,
                &format!("/v1/keys/{}", encode_query(id)),
                None,
                Some(id),
            )
            .map(|_| ()),
        }
    }

    fn verify(&self, config: &Config, req: &VerifyRequest) -> Result<Value, Failure> {
        match self {
            Backend::Local { manager, .. } => manager
                .verify(config, req)
                .map_err(|e| manage_failure(e, None)),
            Backend::Remote(c) => Self::remote(
                c,
                Method::POST,
                "/v1/verify",
                Some(&Self::to_json(req)?),
                None,
            ),
        }
    }

    fn usage(&self, id: &str, days: u32) -> Result<Value, Failure> {
        match self {
            Backend::Local { usage, .. } => usage.report(id, days).map_err(Failure::error),
            Backend::Remote(c) => Self::remote(
                c,
                Method::GET,
                &format!("/v1/keys/{}/usage?days={days}", encode_query(id)),
                None,
                Some(id),
            ),
        }
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEvent>, Failure> {
        match self {
            Backend::Local { manager, .. } => {
                manager.store.list_audit(limit).map_err(Failure::error)
            }
            Backend::Remote(c) => {
                let answer = Self::remote(
                    c,
                    Method::GET,
                    &format!("/v1/audit?limit={}", limit.clamp(1, 10_000)),
                    None,
                    None,
                )?;
                serde_json::from_value(answer["events"].clone())
                    .map_err(|e| Failure::error(format!("unexpected audit answer: {e}")))
            }
        }
    }
}

/// What the key commands need.
struct Ctx {
    config: Config,
    backend: Backend,
    actor: Actor,
}

impl Ctx {
    /// Opens the store, or — when a running gateway holds it — its admin API.
    fn open(config_path: &Path, admin_key_file: Option<&Path>) -> Result<Ctx, Failure> {
        let config = load_config(config_path)?;
        let backend = match Store::open(&config.store.path) {
            Ok(store) => {
                let store = Arc::new(store);
                let usage = Arc::new(Usage::new(store.clone()).map_err(Failure::error)?);
                let mut manager = KeyManager::new(store, None, SecretHasher::from_env());
                manager.usage = usage.clone();
                Backend::Local { manager, usage }
            }
            Err(StoreError::InUse(_)) => {
                Backend::Remote(AdminClient::new(&config, admin_key_file).map_err(Failure::error)?)
            }
            // A store this user may not open (e.g. the service's private state directory) is
            // still managed through the admin API when an admin key is at hand.
            Err(e) => match AdminClient::new(&config, admin_key_file) {
                Ok(client) => Backend::Remote(client),
                Err(_) => return Err(Failure::error(e)),
            },
        };
        Ok(Ctx {
            config,
            backend,
            actor: Actor::local(),
        })
    }

    fn keys(&self, cmd: KeysCommand) -> Outcome {
        match cmd {
            KeysCommand::Create(args) => self.create(args),
            KeysCommand::List(args) => self.list(&args),
            KeysCommand::Show(args) => self.show(&args),
            KeysCommand::Update(args) => self.update(&args),
            KeysCommand::Rotate(args) => self.rotate(&args),
            KeysCommand::Revoke(args) => self.revoke(&args),
            KeysCommand::Delete(args) => self.delete(&args),
            KeysCommand::Verify(args) => self.verify(&args),
        }
    }

    fn create(&self, args: CreateArgs) -> Outcome {
        let mut opts = args.opts;
        if opts.name.is_none() {
            ask_create_fields(&mut opts, &self.config)?;
        }
        let answer = self
            .backend
            .create(&self.config, &key_spec(&opts), &self.actor)?;
        if args.json {
            return emit_json(&answer);
        }
        emit(&render_secret_answer("created", &answer, None))
    }

    fn list(&self, args: &ListArgs) -> Outcome {
        let filter = ListFilter {
            status: Some(args.status.clone()),
            owner: args.owner.clone(),
            q: None,
        };
        let answer = self.backend.list(&filter)?;
        if args.json {
            return emit_json(&answer);
        }
        let keys = answer["keys"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if keys.is_empty() {
            return emit(&format!(
                "{}\n",
                no_keys_message(&args.status, args.owner.as_deref())
            ));
        }
        let (headers, rows) = key_table(keys, args.show_keys);
        emit(&render_table(&headers, &rows))
    }

    /// Like `GET /v1/keys/{id}`: `{"key": …, "usage": <7-day report>}`.
    fn show(&self, args: &ShowArgs) -> Outcome {
        let answer = self.load(&args.id)?;
        if args.json {
            return emit_json(&answer);
        }
        let mut pairs = key_pairs(&answer["key"]);
        pairs.push(("last 7 days", usage_line(&answer["usage"])));
        emit(&render_pairs(&pairs))
    }

    fn update(&self, args: &UpdateArgs) -> Outcome {
        if !has_any_option(&args.opts) {
            return Err(Failure::usage(
                "nothing to update: pass at least one of --name, --description, --owner, --role, --scopes, \
                 --deployments, --expires, --rate-limit",
            ));
        }
        let answer =
            self.backend
                .update(&self.config, &args.id, &key_spec(&args.opts), &self.actor)?;
        if args.json {
            return emit_json(&answer);
        }
        let key = &answer["key"];
        emit(&format!(
            "updated {}\n\n{}",
            key_label(key),
            render_key_block(key)
        ))
    }

    fn rotate(&self, args: &RotateArgs) -> Outcome {
        let current = self.load(&args.id)?;
        let key = &current["key"];
        if let Some(g) = &args.grace {
            parse_duration(g).map_err(|e| Failure::error(format!("--grace: {e}")))?;
        }
        // A revoked key cannot be rotated: let manage say so without asking first.
        if key["status"] != "revoked" {
            let when = match &args.grace {
                Some(g) => format!("after {g}"),
                None => "immediately".to_string(),
            };
            let question = format!(
                "Rotate {}? Its current secret stops working {when}.",
                key_label(key)
            );
            confirm(&question, args.force, "rotate", &args.id)?;
        }
        let answer =
            self.backend
                .rotate(&self.config, &args.id, args.grace.as_deref(), &self.actor)?;
        if args.json {
            return emit_json(&answer);
        }
        emit(&render_secret_answer(
            "rotated",
            &answer,
            Some(args.grace.as_deref()),
        ))
    }

    fn revoke(&self, args: &RevokeArgs) -> Outcome {
        let current = self.load(&args.id)?;
        let key = &current["key"];
        let already = key["status"] == "revoked";
        if !already {
            let question = format!(
                "Revoke {}? It stops working at once, for good.",
                key_label(key)
            );
            confirm(&question, args.force, "revoke", &args.id)?;
        }
        let answer = self.backend.revoke(&args.id, &self.actor)?;
        if args.json {
            return emit_json(&answer);
        }
        let label = key_label(&answer["key"]);
        if already {
            emit(&format!("{label} was already revoked\n"))
        } else {
            emit(&format!("revoked {label}\n"))
        }
    }

    fn delete(&self, args: &DeleteArgs) -> Outcome {
        let current = self.load(&args.id)?;
        let name = current["key"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !args.force {
            confirm_by_name(&args.id, &name)?;
        }
        self.backend.delete(&args.id, &self.actor)?;
        emit(&format!("deleted {} ({name})\n", args.id))
    }

    fn verify(&self, args: &VerifyArgs) -> Outcome {
        let req = VerifyRequest {
            key: read_secret(&args.secret)?,
            deployment: args.deployment.clone(),
            method: args.method.clone(),
            path: args.path.clone(),
            scope: args.scope.clone(),
        };
        let answer = self.backend.verify(&self.config, &req)?;
        if args.json {
            emit_json(&answer)?;
        } else {
            emit(&render_verify(&answer))?;
        }
        if answer["valid"] == true {
            Ok(())
        } else {
            Err(Failure::silent(1))
        }
    }

    fn usage(&self, args: &UsageArgs) -> Outcome {
        let current = self.load(&args.id)?;
        let key = &current["key"];
        let usage = self.backend.usage(&args.id, args.days)?;
        if args.json {
            return emit_json(&usage);
        }
        emit(&render_usage(key, &usage))
    }

    fn audit(&self, args: &AuditArgs) -> Outcome {
        let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
        let events = self.backend.audit(limit)?;
        if args.json {
            return emit_json(&json!({ "events": events }));
        }
        if events.is_empty() {
            return emit("no audit events\n");
        }
        emit(&render_table(&AUDIT_HEADERS, &audit_rows(&events)))
    }

    /// `{"key": …}` for `id`, or "no key with id …".
    fn load(&self, id: &str) -> Result<Value, Failure> {
        self.backend.show(id)
    }
}

/// `error: <message>`; `key_not_found` names the id.
fn manage_failure(e: ManageError, id: Option<&str>) -> Failure {
    match (e, id) {
        (ManageError::Request(GatewayError::KeyNotFound), Some(id)) => {
            Failure::error(format!("no key with id {id}"))
        }
        (e, _) => Failure::error(e),
    }
}

// ---------------------------------------------------------------------------------------
// Option mapping

/// Maps command-line options onto a [`KeySpec`]: lists are split on commas and trimmed
/// (an empty value gives an empty list, which clears scopes on update); `--rate-limit
/// default` clears the key's own limit.
pub fn key_spec(o: &KeyOptions) -> KeySpec {
    KeySpec {
        name: o.name.clone(),
        description: o.description.clone(),
        owner: o.owner.clone(),
        role: o.role.clone(),
        scopes: o.scopes.as_deref().map(split_list),
        deployments: o.deployments.as_deref().map(split_list),
        env: o.env.clone(),
        expires: o.expires.clone(),
        rate_limit: o.rate_limit.as_deref().map(rate_limit_value),
    }
}

/// Splits, trims and drops empty entries.
pub fn split_list(items: &[String]) -> Vec<String> {
    items
        .iter()
        .flat_map(|i| i.split(','))
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(str::to_string)
        .collect()
}

fn rate_limit_value(text: &str) -> Option<String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("default") {
        None
    } else {
        Some(t.to_string())
    }
}

fn has_any_option(o: &KeyOptions) -> bool {
    o.name.is_some()
        || o.description.is_some()
        || o.owner.is_some()
        || o.role.is_some()
        || o.scopes.is_some()
        || o.deployments.is_some()
        || o.env.is_some()
        || o.expires.is_some()
        || o.rate_limit.is_some()
}

// ---------------------------------------------------------------------------------------
// Prompts

/// Writes `question` to `output` and reads one trimmed line; `None` at end of input.
pub fn ask<R: BufRead, W: Write>(
    input: &mut R,
    output: &mut W,
    question: &str,
) -> io::Result<Option<String>> {
    write!(output, "{question}")?;
    output.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        writeln!(output)?;
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

/// Asks on the terminal (prompt on stderr, answer from stdin).
fn prompt(question: &str) -> Result<Option<String>, Failure> {
    ask(&mut io::stdin().lock(), &mut io::stderr(), question)
        .map_err(|e| Failure::error(format!("cannot read the answer: {e}")))
}

fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}

/// `y` or `yes`, any case.
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// A y/N confirmation, skipped with `--force`; refused without a terminal.
fn confirm(question: &str, force: bool, verb: &str, id: &str) -> Outcome {
    if force {
        return Ok(());
    }
    if !stdin_is_terminal() {
        return Err(Failure::error(format!(
            "refusing to {verb} {id} without confirmation: stdin is not a terminal (pass --force to {verb} anyway)"
        )));
    }
    match prompt(&format!("{question} [y/N] "))? {
        Some(a) if is_yes(&a) => Ok(()),
        _ => Err(Failure::error("aborted; nothing changed")),
    }
}

/// Delete confirmation: the user types the key's name.
fn confirm_by_name(id: &str, name: &str) -> Outcome {
    if !stdin_is_terminal() {
        return Err(Failure::error(format!(
            "refusing to delete {id} without confirmation: stdin is not a terminal (pass --force to delete anyway)"
        )));
    }
    let question = format!(
        "This deletes {id} ({name}) and its usage history.\nType the key's name to confirm: "
    );
    match prompt(&question)? {
        Some(typed) if typed == name.trim() => Ok(()),
        _ => Err(Failure::error("the name did not match; nothing deleted")),
    }
}

/// Interactive `keys create`: asks for the name and, when not given, role and deployments.
fn ask_create_fields(opts: &mut KeyOptions, config: &Config) -> Outcome {
    if !stdin_is_terminal() {
        return Err(Failure::usage(
            "--name is required (stdin is not a terminal, so keygate cannot ask for it)",
        ));
    }
    opts.name = Some(ask_name()?);
    if opts.role.is_none() {
        opts.role = ask_role()?;
    }
    if opts.deployments.is_none() {
        let names: Vec<&str> = config.deployments.iter().map(|d| d.name.as_str()).collect();
        let hint = if names.is_empty() {
            String::new()
        } else {
            format!("{}; ", names.join(", "))
        };
        let question = format!("Deployments ({hint}comma-separated, * for all) [*]: ");
        opts.deployments = required_answer(prompt(&question)?)?
            .filter(|a| !a.is_empty())
            .map(|a| vec![a]);
    }
    Ok(())
}

fn ask_name() -> Result<String, Failure> {
    loop {
        let name = required_answer(prompt("Name: ")?)?.unwrap_or_default();
        if !name.is_empty() {
            return Ok(name);
        }
        eprintln!("a name is required");
    }
}

fn ask_role() -> Result<Option<String>, Failure> {
    loop {
        let answer = required_answer(prompt("Role (admin, operator, viewer) [operator]: ")?)?
            .unwrap_or_default();
        if answer.is_empty() {
            return Ok(None);
        }
        match answer.parse::<Role>() {
            Ok(role) => return Ok(Some(role.as_str().to_string())),
            Err(e) => eprintln!("{e}"),
        }
    }
}

/// End of input while asking aborts the command.
fn required_answer(answer: Option<String>) -> Result<Option<String>, Failure> {
    match answer {
        Some(a) => Ok(Some(a)),
        None => Err(Failure::error("aborted; nothing changed")),
    }
}

/// The secret argument of `keys verify`; `-` reads one line from stdin.
fn read_secret(arg: &str) -> Result<String, Failure> {
    if arg != "-" {
        return Ok(arg.trim().to_string());
    }
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::error(format!("cannot read the key from stdin: {e}")))?;
    Ok(line.trim().to_string())
}

// ---------------------------------------------------------------------------------------
// Output

fn emit(text: &str) -> Outcome {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `keygate keys list | head`: the reader went away; that is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::error(format!("cannot write the output: {e}"))),
    }
}

fn emit_json(value: &Value) -> Outcome {
    let text = serde_json::to_string_pretty(value).map_err(Failure::error)?;
    emit(&format!("{text}\n"))
}

/// Columns separated by two spaces, each as wide as its widest cell; no trailing spaces.
pub fn render_table<H: AsRef<str>>(headers: &[H], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.as_ref().chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.as_ref().to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `label: value` lines with the values aligned.
pub fn render_pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let label = format!("{k}:");
        out.push_str(format!("{label:<width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

/// At most `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// An RFC 3339 time as `2026-11-22 10:00` (UTC), for tables.
pub fn short_time(text: &str) -> String {
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => t.with_timezone(&Utc).format("%Y-%m-%d %H:%M").to_string(),
        Err(_) => text.to_string(),
    }
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

/// A string list field joined with `,`, or `-` when empty.
fn list_field(v: &Value, field: &str) -> String {
    let items: Vec<&str> = v[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// `key_… (name)`.
pub fn key_label(key: &Value) -> String {
    format!("{} ({})", str_field(key, "id"), str_field(key, "name"))
}

fn no_keys_message(status: &str, owner: Option<&str>) -> String {
    let kind = if status == "all" {
        String::new()
    } else {
        format!("{status} ")
    };
    match owner {
        Some(o) => format!("no {kind}keys owned by {o}"),
        None => format!("no {kind}keys"),
    }
}

/// The `keys list` table. The KEY column (the masked display form; keygate never has the
/// secrets) appears only with `--show-keys`: even masked, the last four characters are a
/// hint worth keeping off shared screens, and the default table stays narrower.
pub fn key_table(keys: &[Value], show_keys: bool) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let mut headers = vec!["ID", "NAME", "ROLE", "STATUS", "ENV"];
    if show_keys {
        headers.push("KEY");
    }
    headers.extend(["DEPLOYMENTS", "EXPIRES", "LAST USED"]);
    let rows = keys.iter().map(|k| key_row(k, show_keys)).collect();
    (headers, rows)
}

fn key_row(k: &Value, show_keys: bool) -> Vec<String> {
    let mut row = vec![
        str_field(k, "id").to_string(),
        truncate(str_field(k, "name"), 40),
        str_field(k, "role").to_string(),
        str_field(k, "status").to_string(),
        str_field(k, "env").to_string(),
    ];
    if show_keys {
        row.push(str_field(k, "display").to_string());
    }
    row.push(truncate(&list_field(k, "deployments"), 40));
    row.push(
        k["expires_at"]
            .as_str()
            .map_or_else(|| "never".to_string(), short_time),
    );
    row.push(
        k["last_used_at"]
            .as_str()
            .map_or_else(|| "never".to_string(), short_time),
    );
    row
}

/// The `keys show` block (also used after create/update/rotate).
pub fn render_key_block(k: &Value) -> String {
    render_pairs(&key_pairs(k))
}

/// The label/value pairs of a key's block.
fn key_pairs(k: &Value) -> Vec<(&'static str, String)> {
    let deployments = match list_field(k, "deployments").as_str() {
        "*" => "* (all)".to_string(),
        other => other.to_string(),
    };
    let rate_limit = match k["rate_limit"].as_str() {
        None => "default (the role's or gateway's)".to_string(),
        Some("none") => "none (unlimited)".to_string(),
        Some(l) => l.to_string(),
    };
    let mut pairs = vec![
        ("id", str_field(k, "id").to_string()),
        ("name", str_field(k, "name").to_string()),
        ("description", or_dash(str_field(k, "description"))),
        ("owner", or_dash(str_field(k, "owner"))),
        ("role", str_field(k, "role").to_string()),
        ("scopes", list_field(k, "scopes")),
        ("deployments", deployments),
        ("env", str_field(k, "env").to_string()),
        ("key", str_field(k, "display").to_string()),
        ("status", str_field(k, "status").to_string()),
        ("created", str_field(k, "created_at").to_string()),
        (
            "expires",
            k["expires_at"].as_str().unwrap_or("never").to_string(),
        ),
    ];
    if let Some(at) = k["revoked_at"].as_str() {
        pairs.push(("revoked", at.to_string()));
    }
    pairs.push(("rate limit", rate_limit));
    pairs.push(("last used", last_used(k)));
    pairs
}

fn last_used(k: &Value) -> String {
    let Some(at) = k["last_used_at"].as_str() else {
        return "never".to_string();
    };
    let mut text = at.to_string();
    if let Some(ip) = k["last_used_ip"].as_str() {
        text.push_str(&format!(" from {ip}"));
    }
    if let Some(ua) = k["last_used_user_agent"].as_str() {
        text.push_str(&format!(" ({})", truncate(ua, 60)));
    }
    text
}

/// The create/rotate answer: the key, then the secret with the one-time warning.
/// `grace` is `Some(..)` for a rotation (`Some(None)`: the old secret stopped at once).
pub fn render_secret_answer(verb: &str, answer: &Value, grace: Option<Option<&str>>) -> String {
    let key = &answer["key"];
    let mut out = format!("{verb} {}\n\n{}", key_label(key), render_key_block(key));
    out.push_str(&format!(
        "\nsecret:\n\n    {}\n\n",
        str_field(answer, "secret")
    ));
    out.push_str("Store it now, it will not be shown again.\n");
    match grace {
        Some(Some(g)) => out.push_str(&format!("The previous secret keeps working for {g}.\n")),
        Some(None) => out.push_str("The previous secret no longer works.\n"),
        None => {}
    }
    out
}

/// `valid: …` or `invalid: <code> (<message>)`. Never includes the secret.
pub fn render_verify(answer: &Value) -> String {
    let key = &answer["key"];
    if answer["valid"] == true {
        let mut out = format!("valid: {}\n", key_label(key));
        out.push_str(&render_pairs(&[
            ("role", str_field(key, "role").to_string()),
            ("scopes", list_field(key, "scopes")),
            ("deployments", list_field(key, "deployments")),
        ]));
        return out;
    }
    let error = &answer["error"];
    let mut out = format!(
        "invalid: {} ({})\n",
        str_field(answer, "code"),
        str_field(error, "message")
    );
    if key.is_object() {
        out.push_str(&format!("key: {}\n", key_label(key)));
    }
    for field in ["deployment", "required", "expired_at"] {
        if let Some(v) = error[field].as_str() {
            out.push_str(&format!("{}: {v}\n", field.replace('_', " ")));
        }
    }
    out
}

/// One-line usage summary for `keys show`: `245 requests, 2.7% errors`.
pub fn usage_line(usage: &Value) -> String {
    let total = usage["total"].as_u64().unwrap_or(0);
    if total == 0 {
        return "no requests".to_string();
    }
    let error_rate = usage["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
    format!("{}, {error_rate:.1}% errors", plural(total, "request"))
}

const BAR_WIDTH: u64 = 40;

/// The `usage` report: per-day bars, then by operation, by deployment and by status.
pub fn render_usage(key: &Value, usage: &Value) -> String {
    let days = usage["days"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let total = usage["total"].as_u64().unwrap_or(0);
    if total == 0 {
        return format!(
            "no usage recorded yet for {} in the last {}\n",
            key_label(key),
            plural(days.len() as u64, "day")
        );
    }
    let mut out = format!(
        "usage of {} over the last {}\n\n",
        key_label(key),
        plural(days.len() as u64, "day")
    );
    out.push_str(&day_bars(days));
    let avg = usage["avg_per_day"].as_f64().unwrap_or(0.0);
    let error_rate = usage["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
    out.push_str(&format!(
        "\ntotal {total}, {avg:.1}/day, error rate {error_rate:.1}%\n"
    ));
    for (title, field) in [
        ("OPERATION", "by_operation"),
        ("DEPLOYMENT", "by_deployment"),
    ] {
        out.push('\n');
        out.push_str(&render_table(
            &[title, "REQUESTS", "SHARE"],
            &share_rows(&usage[field]),
        ));
    }
    let by_status = &usage["by_status"];
    let classes: Vec<String> = ["2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|c| format!("{c} {}", by_status[*c].as_u64().unwrap_or(0)))
        .collect();
    out.push_str(&format!(
        "\nstatus: {}\nlast used: {}\n",
        classes.join("  "),
        last_used(usage)
    ));
    out
}

fn day_bars(days: &[Value]) -> String {
    let max = days
        .iter()
        .filter_map(|d| d["requests"].as_u64())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = String::new();
    for d in days {
        let n = d["requests"].as_u64().unwrap_or(0);
        let len = usize::try_from(n.saturating_mul(BAR_WIDTH).div_ceil(max)).unwrap_or(0);
        let bar = "█".repeat(len);
        let pad = " ".repeat(usize::try_from(BAR_WIDTH).unwrap_or(0).saturating_sub(len));
        out.push_str(&format!("{}  {bar}{pad}  {n}\n", str_field(d, "date")));
    }
    out
}

fn share_rows(list: &Value) -> Vec<Vec<String>> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                truncate(str_field(e, "name"), 40),
                e["requests"].as_u64().unwrap_or(0).to_string(),
                format!("{:.1}%", e["share"].as_f64().unwrap_or(0.0) * 100.0),
            ]
        })
        .collect()
}

const AUDIT_HEADERS: [&str; 7] = [
    "TIME",
    "ACTION",
    "ACTOR",
    "CLIENT IP",
    "TARGET",
    "NAME",
    "CHANGES",
];

/// Rows of the `audit` table. The actor is the admin key id, `local` for the offline CLI,
/// or `-` when nobody authenticated (`admin.auth_failed`).
pub fn audit_rows(events: &[AuditEvent]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            let actor = match (&e.actor_key_id, &e.client_ip) {
                (Some(id), _) => id.clone(),
                (None, None) => "local".to_string(),
                (None, Some(_)) => "-".to_string(),
            };
            vec![
                short_time(&keygate::keys::rfc3339(&e.time)),
                e.action.clone(),
                actor,
                e.client_ip.clone().unwrap_or_else(|| "-".to_string()),
                e.target_key_id.clone().unwrap_or_else(|| "-".to_string()),
                truncate(e.target_name.as_deref().unwrap_or("-"), 40),
                truncate(&or_dash(&e.changes.join(",")), 40),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn key(overrides: Value) -> Value {
        let mut k = json!({
            "id": "key_AAAAAAAAAAAAAAAA", "name": "CI pipeline", "description": "", "owner": "alice",
            "role": "operator", "scopes": ["read_scenarios"], "deployments": ["my-app"],
            "env": "ci", "display": "kg_ci_****…ab12", "status": "active",
            "created_at": "2026-11-22T10:00:00Z", "expires_at": null,
            "revoked_at": null, "rate_limit": "1000/1h",
            "last_used_at": null, "last_used_ip": null, "last_used_user_agent": null
        });
        if let (Some(k), Some(o)) = (k.as_object_mut(), overrides.as_object()) {
            k.extend(o.clone());
        }
        k
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keygate").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn regenerate_is_an_alias_of_rotate() {
        let cli =
            parse(&["keys", "regenerate", "key_x", "--grace", "1h", "--force"]).expect("parses");
        match cli.command {
            Command::Keys(KeysCommand::Rotate(a)) => {
                assert_eq!(a.id, "key_x");
                assert_eq!(a.grace.as_deref(), Some("1h"));
                assert!(a.force);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn global_options_work_after_the_command() {
        let cli = parse(&[
            "keys",
            "list",
            "--config",
            "/etc/kg.toml",
            "--admin-key-file",
            "/k",
        ])
        .expect("parses");
        assert_eq!(cli.config, PathBuf::from("/etc/kg.toml"));
        assert_eq!(cli.admin_key_file, Some(PathBuf::from("/k")));
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["keys", "create", "--role", "root"][..],
            &["audit", "--limit", "0"],
            &["nope"],
        ] {
            let err = parse(args).expect_err("rejected");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        assert_eq!(Failure::usage("x").code, 2);
        assert_eq!(Failure::error("x").code, 1);
    }

    #[test]
    fn defaults() {
        let cli = parse(&["usage", "key_x"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Usage(UsageArgs {
                days: 7,
                json: false,
                ..
            })
        ));
        let cli = parse(&["audit"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Audit(AuditArgs {
                limit: 50,
                json: false
            })
        ));
        let cli = parse(&["keys", "list"]).expect("parses");
        assert!(
            matches!(cli.command, Command::Keys(KeysCommand::List(ListArgs { ref status, .. })) if status == "active")
        );
    }

    #[test]
    fn options_map_onto_key_spec() {
        let cli = parse(&[
            "keys",
            "create",
            "--name",
            "CI",
            "--scopes",
            "a, b,,a",
            "--scopes",
            "c",
            "--deployments",
            "*",
            "--rate-limit",
            "1000/1h",
            "--expires",
            "90d",
            "--env",
            "ci",
        ])
        .expect("parses");
        let Command::Keys(KeysCommand::Create(args)) = cli.command else {
            panic!("not create")
        };
        let spec = key_spec(&args.opts);
        assert_eq!(spec.name.as_deref(), Some("CI"));
        assert_eq!(
            spec.scopes,
            Some(vec![
                "a".to_string(),
                "b".to_string(),
                "a".to_string(),
                "c".to_string()
            ])
        );
        assert_eq!(spec.deployments, Some(vec!["*".to_string()]));
        assert_eq!(spec.rate_limit, Some(Some("1000/1h".to_string())));
        assert_eq!(spec.expires.as_deref(), Some("90d"));
        assert_eq!(spec.env.as_deref(), Some("ci"));
        assert_eq!(spec.role, None);
        assert_eq!(spec.owner, None);
    }

    #[test]
    fn update_options_clear_and_leave_alone() {
        let opts = KeyOptions {
            scopes: Some(vec![String::new()]),
            rate_limit: Some("Default".to_string()),
            ..KeyOptions::default()
        };
        let spec = key_spec(&opts);
        assert_eq!(spec.scopes, Some(vec![]));
        assert_eq!(spec.rate_limit, Some(None));
        assert_eq!(spec.deployments, None);
        assert!(has_any_option(&opts));
        assert!(!has_any_option(&KeyOptions::default()));
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let rows = vec![
            vec!["a".to_string(), "long value".to_string(), "x".to_string()],
            vec!["bbbb".to_string(), "…".to_string(), String::new()],
        ];
        let text = render_table(&["H1", "H2", "H3"], &rows);
        assert_eq!(text, "H1    H2          H3\na     long value  x\nbbbb  …\n");
    }

    #[test]
    fn list_table_shows_key_column_only_on_request() {
        let keys = [key(json!({"expires_at": "2027-01-02T03:04:05Z"}))];
        let (headers, rows) = key_table(&keys, false);
        assert_eq!(
            headers,
            [
                "ID",
                "NAME",
                "ROLE",
                "STATUS",
                "ENV",
                "DEPLOYMENTS",
                "EXPIRES",
                "LAST USED"
            ]
        );
        assert_eq!(
            rows[0],
            [
                "key_AAAAAAAAAAAAAAAA",
                "CI pipeline",
                "operator",
                "active",
                "ci",
                "my-app",
                "2027-01-02 03:04",
                "never"
            ]
        );
        let (headers, rows) = key_table(&keys, true);
        assert_eq!(headers[5], "KEY");
        assert_eq!(rows[0][5], "kg_ci_****…ab12");
    }

    #[test]
    fn key_block_reads_well() {
        let text = render_key_block(&key(json!({"deployments": ["*"], "rate_limit": null})));
        assert!(
            text.contains("id:           key_AAAAAAAAAAAAAAAA\n"),
            "{text}"
        );
        assert!(text.contains("deployments:  * (all)\n"), "{text}");
        assert!(text.contains("description:  -\n"), "{text}");
        assert!(text.contains("rate limit:   default"), "{text}");
        assert!(text.contains("expires:      never\n"), "{text}");
        assert!(!text.contains("revoked:"), "{text}");
        assert!(text.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn secret_answer_warns_once() {
        let answer = json!({"key": key(json!({})), "secret": "kg_ci_SECRET"});
        let text = render_secret_answer("created", &answer, None);
        assert_eq!(text.matches("kg_ci_SECRET").count(), 1);
        assert!(text.contains("Store it now, it will not be shown again."));
        let text = render_secret_answer("rotated", &answer, Some(Some("1h")));
        assert!(text.contains("keeps working for 1h"));
    }

    #[test]
    fn verify_output_names_the_code() {
        let answer = json!({"valid": false, "code": "deployment_forbidden", "key": key(json!({})),
            "error": {"code": "deployment_forbidden", "message": "the API key is not allowed on this deployment", "deployment": "other"}});
        let text = render_verify(&answer);
        assert!(
            text.starts_with("invalid: deployment_forbidden (the API key is not allowed"),
            "{text}"
        );
        assert!(text.contains("deployment: other"), "{text}");
        let answer = json!({"valid": true, "code": null, "key": key(json!({}))});
        assert!(render_verify(&answer).starts_with("valid: key_AAAAAAAAAAAAAAAA (CI pipeline)"));
    }

    #[test]
    fn unused_key_has_no_usage() {
        let usage = json!({"key_id": "key_x", "days": [{"date": "2026-03-01", "requests": 0}], "total": 0,
            "by_operation": [], "by_deployment": [], "by_status": {}, "error_rate": 0.0});
        let text = render_usage(&key(json!({})), &usage);
        assert_eq!(
            text,
            "no usage recorded yet for key_AAAAAAAAAAAAAAAA (CI pipeline) in the last 1 day\n"
        );
        assert_eq!(usage_line(&usage), "no requests");
        assert_eq!(
            usage_line(&json!({"total": 200, "error_rate": 0.027})),
            "200 requests, 2.7% errors"
        );
    }

    #[test]
    fn usage_report_draws_bars() {
        let usage = json!({"key_id": "key_x", "days": [{"date": "2026-03-01", "requests": 10}, {"date": "2026-03-02", "requests": 5}],
            "total": 15, "avg_per_day": 7.5, "by_operation": [{"name": "GET", "requests": 15, "share": 1.0}],
            "by_deployment": [{"name": "my-app", "requests": 15, "share": 1.0}],
            "by_status": {"2xx": 15, "3xx": 0, "4xx": 0, "5xx": 0}, "error_rate": 0.0,
            "last_used_at": null, "last_used_ip": null, "last_used_user_agent": null});
        let text = render_usage(&key(json!({})), &usage);
        assert!(
            text.contains(&format!("2026-03-01  {}  10\n", "█".repeat(40))),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "2026-03-02  {}{}  5\n",
                "█".repeat(20),
                " ".repeat(20)
            )),
            "{text}"
        );
        assert!(text.contains("my-app      15        100.0%"), "{text}");
    }

    #[test]
    fn audit_rows_name_the_actor() {
        let ev = Actor::local().event(
            "key.updated",
            Some("key_x"),
            Some("CI"),
            vec!["name".into(), "role".into()],
        );
        let failed = AuditEvent {
            client_ip: Some("10.0.0.1".into()),
            ..Actor::local().event("admin.auth_failed", None, None, vec![])
        };
        let rows = audit_rows(&[ev, failed]);
        assert_eq!(
            rows[0][1..],
            ["key.updated", "local", "-", "key_x", "CI", "name,role"]
        );
        assert_eq!(
            rows[1][1..],
            ["admin.auth_failed", "-", "10.0.0.1", "-", "-", "-"]
        );
    }

    #[test]
    fn ask_reads_one_trimmed_line() {
        let mut input = io::Cursor::new("  my key \nrest\n");
        let mut output = Vec::new();
        let answer = ask(&mut input, &mut output, "Name: ").expect("io");
        assert_eq!(answer.as_deref(), Some("my key"));
        assert_eq!(output, b"Name: ");
        let mut empty = io::Cursor::new("");
        assert_eq!(
            ask(&mut empty, &mut Vec::new(), "Name: ").expect("io"),
            None
        );
    }

    #[test]
    fn small_helpers() {
        assert!(is_yes("Y") && is_yes(" yes ") && !is_yes("") && !is_yes("no"));
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(short_time("2026-11-22T10:00:59Z"), "2026-11-22 10:00");
        assert_eq!(plural(1, "deployment"), "1 deployment");
        assert_eq!(plural(0, "deployment"), "0 deployments");
        assert_eq!(no_keys_message("all", Some("bob")), "no keys owned by bob");
        assert_eq!(no_keys_message("revoked", None), "no revoked keys");
    }

    #[test]
    fn missing_key_names_the_id() {
        let f = manage_failure(
            ManageError::Request(GatewayError::KeyNotFound),
            Some("key_zz"),
        );
        assert_eq!(f.message.as_deref(), Some("error: no key with id key_zz"));
        assert_eq!(f.code, 1);
    }

    #[test]
    fn config_errors_keep_file_line_col() {
        let e = ConfigError {
            file: "gw.toml".into(),
            line: 3,
            col: 5,
            message: "unknown field `x`".into(),
        };
        let f = Failure::config(Path::new("Cargo.toml"), &e);
        assert_eq!(f.message.as_deref(), Some("gw.toml:3:5: unknown field `x`"));
        assert_eq!(f.code, 1);
    }
}
