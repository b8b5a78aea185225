//! The compiled `keygate` binary: `check` and its file:line:col errors, the offline key
//! lifecycle through the CLI, the store lock while a gateway runs, and `serve` as a child
//! process (graceful shutdown on SIGTERM, no secrets in its logs).
//!
//! Every test works in its own temporary directory with its own `gateway.toml` whose
//! listeners are on 127.0.0.1:0; a served gateway's address is read from its JSON log line
//! `data plane listening`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::serve::{keygate, run_command, signal, Out, Serve, SERVE_TIMEOUT};
use common::{
    gated_upstream, get, send, Answer, CREATE_SCENARIOS_ROUTE, KEY_FIELDS, READ_SCENARIOS_ROUTE,
};
use http::Method;
use serde_json::Value;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// A test directory with a `gateway.toml`.
struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    /// `gateway.toml` with both listeners on 127.0.0.1:0, a relative store path, JSON logs,
    /// then `rest`.
    fn new(rest: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \"data/keygate.redb\"\n\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\n{rest}\n"
        );
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, text).unwrap();
        Env { dir, config }
    }

    /// `keygate --config <gateway.toml>`, run in the test directory without a terminal and
    /// without any keygate variables from the outer environment.
    fn command(&self) -> Command {
        self.command_for(&self.config)
    }

    /// The same with another configuration file.
    fn command_for(&self, config: &Path) -> Command {
        keygate(self.dir.path(), config)
    }

    fn run(&self, args: &[&str]) -> Out {
        let mut c = self.command();
        c.args(args);
        run_command(c)
    }

    /// `keys create --json` with `args`; returns (id, secret).
    fn create_key(&self, args: &[&str]) -> (String, String) {
        let mut all = vec!["keys", "create", "--json"];
        all.extend_from_slice(args);
        let v = self.run(&all).ok().json();
        (
            v["key"]["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    }
}

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The 38-character body of a secret (what a leak would show even if re-prefixed).
fn body(secret: &str) -> &str {
    &secret[secret.len() - 38..]
}

// ---------------------------------------------------------------------------------------
// `keygate check`
// ---------------------------------------------------------------------------------------

/// A valid configuration file.
fn good() -> String {
    format!(
        r#"
[auth]
query_param = ""

[rate_limit]
default = "100/1m"

[rate_limit.roles]
viewer = "10/1s"

[[deployments]]
name = "my-app"
upstream = "http://127.0.0.1:9000/base"
path_prefix = "/my-app"
timeout = "30s"
{CREATE_SCENARIOS_ROUTE}
[[deployments]]
name = "echo"
upstream = "echo"
"#
    )
}

#[test]
fn check_accepts_a_good_file() {
    let env = Env::new(&good());
    let out = env.run(&["check"]).ok();
    assert!(out.stderr.trim().is_empty(), "{out:?}");
    assert!(
        !env.dir.path().join("data").exists(),
        "check must not create the store"
    );
}

#[test]
fn check_reports_errors_with_line_and_column() {
    // (what, text, line, column, a word of the reason)
    let cases: &[(&str, &str, usize, usize, &str)] = &[
        ("unknown field", "# keygate\n[server]\nlisten = \"127.0.0.1:0\"\nidle_timout = \"5s\"\n", 4, 1, "idle_timout"),
        (
            "bad duration",
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \"data/k.redb\"\nusage_flush_interval = \"1 sec\"\n",
            6,
            24,
            "duration",
        ),
        (
            "duplicate deployment",
            "[[deployments]]\nname = \"api\"\nupstream = \"echo\"\n\n[[deployments]]\nname = \"web\"\nupstream = \"echo\"\n\n\
             [[deployments]]\n  name = \"api\"\nupstream = \"echo\"\n",
            10,
            10,
            "duplicate",
        ),
        (
            "upstream without a scheme",
            "[[deployments]]\nname = \"api\"\nupstream = \"127.0.0.1:9000\"\n",
            3,
            12,
            "upstream",
        ),
        ("upstream with another scheme", "[[deployments]]\nname = \"api\"\n  upstream = \"ftp://files\"\n", 3, 14, "upstream"),
        (
            "bad role limit",
            "[rate_limit]\ndefault = \"1000/1m\"\n\n[rate_limit.roles]\nviewer = \"lots/1m\"\n",
            5,
            10,
            "lots",
        ),
        ("bad default limit", "[rate_limit]\ndefault = \"1000/1m\"\nfailed_auth_per_ip = \"30 per minute\"\n", 3, 22, "30 per minute"),
    ];
    for (what, text, line, col, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        let mut c = keygate(dir.path(), &path);
        c.arg("check");
        let out = run_command(c);
        assert_eq!(out.code, Some(1), "{what}: {out:?}");
        let location = format!("{}:{line}:{col}", path.display());
        assert!(
            out.stderr.contains(&location),
            "{what}: expected {location} in {:?}",
            out.stderr
        );
        assert!(
            out.stderr.contains(reason),
            "{what}: expected {reason:?} in {:?}",
            out.stderr
        );
    }
}

#[test]
fn check_of_a_missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = keygate(dir.path(), Path::new("nope.toml"));
    c.arg("check");
    let out = run_command(c);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("nope.toml"), "{out:?}");
}

#[test]
fn the_shipped_gateway_toml_passes_check() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let dir = tempfile::tempdir().unwrap();
    let mut c = keygate(dir.path(), &shipped);
    c.arg("check");
    let out = run_command(c);
    assert_eq!(out.code, Some(0), "{out:?}");
    // KEYGATE_CONFIG is the default for --config.
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.arg("check")
        .current_dir(dir.path())
        .env("KEYGATE_CONFIG", &shipped);
    assert_eq!(run_command(c).code, Some(0));
}

// ---------------------------------------------------------------------------------------
// Offline key lifecycle
// ---------------------------------------------------------------------------------------

/// `my-app` on the built-in echo upstream, with the create/read scope rules on `/scenarios`.
fn app() -> String {
    format!(
        "\n[[deployments]]\nname = \"my-app\"\nupstream = \"echo\"\n{CREATE_SCENARIOS_ROUTE}{READ_SCENARIOS_ROUTE}"
    )
}

#[track_caller]
fn assert_record_shape(key: &Value) {
    let mut got: Vec<&str> = key
        .as_object()
        .expect("key object")
        .keys()
        .map(String::as_str)
        .collect();
    got.sort_unstable();
    let mut want = KEY_FIELDS.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{key}");
}

#[test]
fn offline_key_lifecycle() {
    let env = Env::new(&app());

    // create
    let out = env
        .run(&[
            "keys",
            "create",
            "--name",
            "CI pipeline",
            "--owner",
            "alice",
            "--role",
            "operator",
            "--scopes",
            "read_scenarios",
            "--deployments",
            "my-app",
            "--env",
            "ci",
            "--rate-limit",
            "1000/1h",
            "--json",
        ])
        .ok();
    let created = out.json();
    let key = &created["key"];
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = key["id"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with("kg_ci_") && secret.len() == 6 + 38 && is_base62(body(&secret)),
        "{secret}"
    );
    assert!(
        id.starts_with("key_") && id.len() == 20 && is_base62(&id[4..]),
        "{id}"
    );
    assert_record_shape(key);
    assert_eq!(key["name"], "CI pipeline");
    assert_eq!(key["owner"], "alice");
    assert_eq!(key["role"], "operator");
    assert_eq!(key["scopes"], serde_json::json!(["read_scenarios"]));
    assert_eq!(key["deployments"], serde_json::json!(["my-app"]));
    assert_eq!(key["env"], "ci");
    assert_eq!(key["status"], "active");
    assert_eq!(key["rate_limit"], "1000/1h");
    assert_eq!(key["expires_at"], Value::Null);
    assert_eq!(
        key["display"],
        format!("kg_ci_****…{}", &secret[secret.len() - 4..])
    );
    assert_eq!(
        out.stdout.matches(&secret).count(),
        1,
        "the secret is shown exactly once"
    );

    // list: never the secret, in any form
    for args in [
        &["keys", "list", "--json"][..],
        &["keys", "list"],
        &["keys", "list", "--show-keys"],
        &["keys", "list", "--status", "all"],
    ] {
        let out = env.run(args).ok();
        assert!(out.stdout.contains(&id), "{args:?}: {out:?}");
        assert!(
            !out.all().contains(body(&secret)),
            "{args:?} shows the secret: {out:?}"
        );
    }
    let listed = env.run(&["keys", "list", "--json"]).ok().json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "{listed}");
    assert_record_shape(&listed["keys"][0]);

    // show
    let out = env.run(&["keys", "show", &id, "--json"]).ok();
    assert_eq!(out.json()["key"]["id"], id.as_str());
    assert!(!out.all().contains(body(&secret)));
    let out = env.run(&["keys", "show", &id]).ok();
    assert!(
        out.stdout.contains("CI pipeline") && !out.all().contains(body(&secret)),
        "{out:?}"
    );

    // verify: valid, then a route scope the key lacks
    let out = env.run(&["keys", "verify", &secret]).ok();
    assert!(
        !out.all().contains(body(&secret)),
        "verify echoes the secret: {out:?}"
    );
    let out = env.run(&[
        "keys",
        "verify",
        &secret,
        "--deployment",
        "my-app",
        "--method",
        "POST",
        "--path",
        "/scenarios",
    ]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.all().contains("insufficient_scope"), "{out:?}");

    // update
    let out = env
        .run(&[
            "keys",
            "update",
            &id,
            "--name",
            "CI pipeline 2",
            "--rate-limit",
            "10/1m",
            "--json",
        ])
        .ok();
    let v = out.json();
    assert_eq!(v["key"]["name"], "CI pipeline 2");
    assert_eq!(v["key"]["rate_limit"], "10/1m");
    let shown = env.run(&["keys", "show", &id, "--json"]).ok().json();
    assert_eq!(shown["key"]["name"], "CI pipeline 2");
    assert_eq!(shown["key"]["rate_limit"], "10/1m");
    assert_eq!(
        shown["key"]["owner"], "alice",
        "update keeps the other fields"
    );

    // rotate: a new secret for the same id; the old one stops at once
    let rotated = env
        .run(&["keys", "rotate", &id, "--force", "--json"])
        .ok()
        .json();
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    assert!(
        new_secret.starts_with("kg_ci_") && new_secret.len() == 44,
        "{new_secret}"
    );
    assert_eq!(rotated["key"]["id"], id.as_str());
    let out = env.run(&["keys", "verify", &secret]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.all().contains("invalid_key"), "{out:?}");
    env.run(&["keys", "verify", &new_secret]).ok();
    let v = env
        .run(&["keys", "verify", &new_secret, "--json"])
        .ok()
        .json();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["key"]["id"], id.as_str());

    // revoke
    env.run(&["keys", "revoke", &id, "--force"]).ok();
    assert_eq!(
        env.run(&["keys", "show", &id, "--json"]).ok().json()["key"]["status"],
        "revoked"
    );
    let out = env.run(&["keys", "verify", &new_secret]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.all().contains("invalid_key"), "{out:?}");
    let v = env.run(&["keys", "verify", &new_secret, "--json"]);
    assert_eq!(v.code, Some(1));
    assert_eq!(v.json()["code"], "invalid_key");
    let active = env.run(&["keys", "list", "--json"]).ok().json();
    assert_eq!(
        active["keys"],
        serde_json::json!([]),
        "revoked keys are not active"
    );
    let revoked = env
        .run(&["keys", "list", "--status", "revoked", "--json"])
        .ok()
        .json();
    assert_eq!(revoked["keys"][0]["id"], id.as_str());

    // delete
    env.run(&["keys", "delete", &id, "--force"]).ok();
    let out = env.run(&["keys", "show", &id]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&id), "{out:?}");
    let all = env
        .run(&["keys", "list", "--status", "all", "--json"])
        .ok()
        .json();
    assert_eq!(all["keys"], serde_json::json!([]));

    // The audit trail keeps every step, and no secret.
    let out = env.run(&["audit", "--json"]).ok();
    let actions: Vec<String> = out.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    for a in [
        "key.created",
        "key.updated",
        "key.rotated",
        "key.revoked",
        "key.deleted",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    assert!(!out.all().contains(body(&secret)) && !out.all().contains(body(&new_secret)));
}

#[test]
fn without_a_terminal_destructive_commands_need_force() {
    let env = Env::new(&app());
    let (id, secret) = env.create_key(&["--name", "keep me"]);
    for args in [
        &["keys", "delete", &id][..],
        &["keys", "revoke", &id],
        &["keys", "rotate", &id],
    ] {
        let out = env.run(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains("--force"), "{args:?}: {out:?}");
    }
    // Nothing changed.
    let shown = env.run(&["keys", "show", &id, "--json"]).ok().json();
    assert_eq!(shown["key"]["status"], "active");
    env.run(&["keys", "verify", &secret]).ok();

    // create needs --name when it cannot ask (a usage error).
    let out = env.run(&["keys", "create", "--role", "viewer"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--name"), "{out:?}");
    assert_eq!(
        env.run(&["keys", "list", "--status", "all", "--json"])
            .ok()
            .json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn verify_rejects_odd_secrets_without_crashing() {
    let env = Env::new(&app());
    env.create_key(&["--name", "k"]);
    let tail = "A".repeat(38);
    for bad in [
        "nonsense".to_string(),
        format!("kg_a\u{e9}{tail}"),
        format!("kg_prod_{}\u{e9}", "A".repeat(37)),
    ] {
        let out = env.run(&["keys", "verify", &bad]);
        assert_eq!(out.code, Some(1), "{bad:?}: {out:?}");
        assert!(out.all().contains("invalid_key"), "{bad:?}: {out:?}");
    }
}

// ---------------------------------------------------------------------------------------
// `keygate serve` as a child process
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drains_in_flight_requests_on_sigterm() {
    let mut up = gated_upstream().await;
    let env = Env::new(&format!(
        "[rate_limit]\ndefault = \"none\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"http://{}\"\n",
        up.addr
    ));
    // The grace is long: the gateway must exit as soon as the in-flight request is done.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[server]\n", "[server]\nshutdown_grace = \"60s\"\n");
    std::fs::write(&env.config, text).unwrap();
    let (_, secret) = env.create_key(&["--name", "drain"]);
    let mut serve = Serve::start(env.command()).await;
    let addr = serve.addr;

    let a = get(addr, "/hello", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(&a.body[..], b"ok");

    // A slow request is in flight at the upstream...
    let s = secret.clone();
    let in_flight =
        tokio::spawn(async move { get(addr, "/slow?ms=20000", &[("x-api-key", &s)]).await });
    tokio::time::timeout(SERVE_TIMEOUT, up.arrived.recv())
        .await
        .expect("the slow request reached the upstream")
        .unwrap();

    // ...when the gateway is told to stop.
    signal(serve.pid, "TERM");
    serve
        .wait_for_log_where("a \"shutting down\" log line", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("shutting down"))
        })
        .await;

    // New connections are refused while the old request is still being served.
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        match TcpStream::connect(addr).await {
            // Refused, or reset by a listener closing during the handshake: not accepted.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break
            }
            Err(e) => panic!("unexpected connect error {e}"),
            Ok(conn) => {
                // The listener may take a moment to close after the log line.
                drop(conn);
                assert!(
                    Instant::now() < deadline,
                    "still accepting connections after shutdown began"
                );
                tokio::task::yield_now().await;
            }
        }
    }
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before it was released"
    );

    up.release.notify_one();
    let a: Answer = tokio::time::timeout(SERVE_TIMEOUT, in_flight)
        .await
        .expect("in-flight request finished")
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(&a.body[..], b"slow done");

    let status = serve.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", serve.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_commands_refuse_a_store_in_use_without_damaging_it() {
    let env = Env::new(&app());
    let (id, secret) = env.create_key(&["--name", "before serve", "--scopes", "read_scenarios"]);
    let mut serve = Serve::start(env.command()).await;

    for args in [
        &["keys", "list"][..],
        &["keys", "create", "--name", "while serving"],
        &["keys", "show", &id],
    ] {
        let out = env.run(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        // A clear message: the store is in use by a running gateway, and how to proceed.
        let says_in_use =
            out.stderr.contains("in use") || out.stderr.contains("held by a running keygate");
        assert!(
            says_in_use && out.stderr.contains("KEYGATE_ADMIN_KEY"),
            "{args:?}: expected a clear 'store in use' message: {out:?}"
        );
    }
    // The gateway keeps serving the key.
    let a = get(serve.addr, "/scenarios", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, 200, "{a:?}");

    let status = serve.stop().await;
    assert_eq!(status.code(), Some(0), "{}", serve.output());
    let listed = env.run(&["keys", "list", "--json"]).ok().json();
    let ids: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()], "{listed}");
    env.run(&["keys", "verify", &secret]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_never_logs_secrets() {
    let env = Env::new(&format!(
        "[auth]\nquery_param = \"api_key\"\n\n[rate_limit]\ndefault = \"none\"\nfailed_auth_per_ip = \"none\"\n{}",
        app()
    ));
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("level = \"info\"", "level = \"debug\"");
    std::fs::write(&env.config, text).unwrap();
    let (id, secret) = env.create_key(&["--name", "logged", "--scopes", "read_scenarios"]);
    let (_, revoked) = env.create_key(&["--name", "revoked"]);
    let revoked_id = env.run(&["keys", "list", "--json"]).ok().json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "revoked")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.run(&["keys", "revoke", &revoked_id, "--force"]).ok();
    let unknown = keygate::keys::generate_secret("kg", "prod").unwrap();
    let mistyped = {
        let mut b = secret.clone().into_bytes();
        let i = b.len() - 9;
        b[i] = if b[i] == b'x' { b'y' } else { b'x' };
        String::from_utf8(b).unwrap()
    };

    let mut c = env.command();
    c.env("RUST_LOG", "debug");
    let mut serve = Serve::start(c).await;
    let addr = serve.addr;
    let bearer = format!("Bearer {secret}");
    let checks: Vec<(Answer, u16)> = vec![
        (
            get(addr, "/scenarios", &[("x-api-key", &secret)]).await,
            200,
        ),
        (
            get(addr, "/scenarios/7", &[("authorization", &bearer)]).await,
            200,
        ),
        (
            get(addr, &format!("/scenarios?api_key={secret}&page=2"), &[]).await,
            200,
        ),
        (
            get(addr, &format!("/scenarios?api_key={unknown}"), &[]).await,
            401,
        ),
        (
            get(addr, "/scenarios", &[("x-api-key", &mistyped)]).await,
            401,
        ),
        (
            get(addr, "/scenarios", &[("x-api-key", &revoked)]).await,
            401,
        ),
        (
            get(
                addr,
                "/scenarios",
                &[
                    ("x-api-key", &secret),
                    ("authorization", &format!("Bearer {unknown}")),
                ],
            )
            .await,
            400,
        ),
        (
            send(
                addr,
                Method::POST,
                "/scenarios",
                &[("x-api-key", &secret)],
                "{}",
            )
            .await,
            403,
        ),
        (
            get(
                addr,
                "/.keygate/auth",
                &[("x-original-uri", &format!("/scenarios?api_key={secret}"))],
            )
            .await,
            200,
        ),
    ];
    for (i, (a, want)) in checks.iter().enumerate() {
        assert_eq!(a.status.as_u16(), *want, "request {i}: {a:?}");
    }
    // The echo upstream saw the request without the credential.
    let echoed = String::from_utf8_lossy(&checks[2].0.body).into_owned();
    assert!(
        !echoed.contains(body(&secret)),
        "the query key was forwarded: {echoed}"
    );

    let status = serve.stop().await;
    assert_eq!(status.code(), Some(0));
    let log = serve.output();
    for (what, s) in [
        ("valid", &secret),
        ("revoked", &revoked),
        ("unknown", &unknown),
        ("mistyped", &mistyped),
    ] {
        assert!(
            !log.contains(body(s)),
            "the {what} secret appears in the logs:\n{log}"
        );
    }

    // The key id is in an access log line with the request's facts.
    let access: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["key_id"] == id.as_str())
        .collect();
    let line = access
        .iter()
        .find(|v| v["status"] == 200 && v["operation"] == "read_scenarios")
        .unwrap_or_else(|| panic!("no access line for {id} with status 200:\n{log}"));
    assert_eq!(line["deployment"], "my-app", "{line}");
    assert!(
        line.as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("latency")),
        "no latency field: {line}"
    );
    assert!(
        access
            .iter()
            .any(|v| v["status"] == 403 && v["operation"] == "create_scenarios"),
        "{access:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_commands_use_the_admin_api_while_serving() {
    let env = Env::new(&app());
    let (admin_id, admin_secret) = env.create_key(&["--name", "ops admin", "--role", "admin"]);
    let (_, operator_secret) = env.create_key(&["--name", "not an admin"]);
    let mut serve = Serve::start(env.command()).await;
    let admin_addr = serve.listen_addr("admin API listening").await;

    // The served file says 127.0.0.1:0 for the admin API; a client config (elsewhere, so the
    // gateway's file watcher never sees it) names the bound address and the same store.
    let client_dir = tempfile::tempdir().unwrap();
    let client_config = client_dir.path().join("client.toml");
    let store = env.dir.path().join("data/keygate.redb");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin_addr}\""),
        )
        .replace(
            "path = \"data/keygate.redb\"",
            &format!("path = {:?}", store.display().to_string()),
        );
    std::fs::write(&client_config, text).unwrap();
    let key_file = client_dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{admin_secret}\n")).unwrap();
    let cli = |key: &str, args: &[&str]| {
        let mut c = env.command_for(&client_config);
        c.env("KEYGATE_ADMIN_KEY", key).args(args);
        run_command(c)
    };

    // create through the admin API: the new key works on the data plane at once.
    let created = cli(
        &admin_secret,
        &[
            "keys",
            "create",
            "--name",
            "live",
            "--scopes",
            "read_scenarios",
            "--json",
        ],
    )
    .ok()
    .json();
    let (live_id, live_secret) = (
        created["key"]["id"].as_str().unwrap().to_string(),
        created["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        get(serve.addr, "/scenarios", &[("x-api-key", &live_secret)])
            .await
            .status,
        200
    );

    // list with --admin-key-file (and no KEYGATE_ADMIN_KEY): no secrets in the answer.
    let mut c = env.command_for(&client_config);
    c.arg("--admin-key-file")
        .arg(&key_file)
        .args(["keys", "list", "--json"]);
    let out = run_command(c).ok();
    let ids: Vec<String> = out.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&live_id) && ids.contains(&admin_id), "{ids:?}");
    for s in [&admin_secret, &operator_secret, &live_secret] {
        assert!(!out.all().contains(body(s)), "list shows a secret: {out:?}");
    }

    // revoke through the admin API: enforced before the command returns.
    cli(&admin_secret, &["keys", "revoke", &live_id, "--force"]).ok();
    let a = get(serve.addr, "/scenarios", &[("x-api-key", &live_secret)]).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(a.code(), "invalid_key");

    // A key without the admin role cannot manage keys.
    let out = cli(&operator_secret, &["keys", "create", "--name", "sneaky"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        !out.all().contains(body(&operator_secret)),
        "the admin key is echoed: {out:?}"
    );

    let status = serve.stop().await;
    assert_eq!(status.code(), Some(0), "{}", serve.output());
    let all = env
        .run(&["keys", "list", "--status", "all", "--json"])
        .ok()
        .json();
    let names: Vec<&str> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.contains(&"sneaky"), "{names:?}");
    let events = env.run(&["audit", "--json"]).ok().json();
    let revoked = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.revoked")
        .expect("revocation audited");
    assert_eq!(revoked["actor_key_id"], admin_id.as_str(), "{revoked}");
    assert_eq!(revoked["target_key_id"], live_id.as_str(), "{revoked}");
}
