//! Usage accounting and metrics end to end (SPEC §3): counts by deployment, operation and
//! status class in the report and on disk; nothing lost on a graceful shutdown, at most one
//! flush interval on `kill -9` of the real binary; delete drops usage, revoke keeps it;
//! `/metrics` is valid Prometheus text that moves with traffic; old days are pruned.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::serve::{keygate, run_command, Serve};
use common::*;
use http::{HeaderValue, Method};
use keygate::audit::Actor;
use keygate::manage::KeySpec;
use keygate::store::{Store, StoreError};
use keygate::usage::{day_number, Hit, Operation, Usage, UsageReader};
use redb::{ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The usage table as `keygate::usage` lays it out: (key id, day, deployment, operation,
/// status class) → requests. Read directly to check what is really on disk.
const USAGE: TableDefinition<(&str, u32, &str, &str, u8), u64> = TableDefinition::new("usage");
/// key id → JSON of the last use.
const LAST_USED: TableDefinition<&str, &[u8]> = TableDefinition::new("last_used");

/// (deployment, operation, status class "2xx".."5xx") → requests.
type Counts = BTreeMap<(String, String, String), u64>;

fn class_name(c: u8) -> String {
    ["2xx", "3xx", "4xx", "5xx"]
        .get(usize::from(c))
        .map_or_else(|| format!("class{c}"), |s| s.to_string())
}

/// The rows stored for `id`, summed over days.
fn stored_counts(store: &Store, id: &str) -> Counts {
    let txn = store.database().begin_read().unwrap();
    let table = txn.open_table(USAGE).unwrap();
    let mut out = Counts::new();
    for row in table.iter().unwrap() {
        let (k, v) = row.unwrap();
        let (key, _day, dep, op, class) = k.value();
        if key == id {
            *out.entry((dep.to_string(), op.to_string(), class_name(class)))
                .or_default() += v.value();
        }
    }
    out
}

/// (day, requests) rows stored for `id`, summed over everything else.
fn stored_days(store: &Store, id: &str) -> BTreeMap<u32, u64> {
    let txn = store.database().begin_read().unwrap();
    let table = txn.open_table(USAGE).unwrap();
    let mut out = BTreeMap::new();
    for row in table.iter().unwrap() {
        let (k, v) = row.unwrap();
        let (key, day, ..) = k.value();
        if key == id {
            *out.entry(day).or_default() += v.value();
        }
    }
    out
}

fn stored_last_used(store: &Store, id: &str) -> Option<Value> {
    let txn = store.database().begin_read().unwrap();
    let table = txn.open_table(LAST_USED).unwrap();
    let v = table.get(id).unwrap()?;
    Some(serde_json::from_slice(v.value()).unwrap())
}

fn counts(rows: &[(&str, &str, &str, u64)]) -> Counts {
    let mut out = Counts::new();
    for (dep, op, class, n) in rows {
        *out.entry((dep.to_string(), op.to_string(), class.to_string()))
            .or_default() += n;
    }
    out
}

/// `{"name": n}` entries of a report list as a map name → requests.
fn by_name(v: &Value) -> BTreeMap<String, u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Opens a store file once the process that had it has let go (bounded).
async fn reopen(path: &Path) -> Store {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path) {
            Ok(s) => return s,
            Err(StoreError::InUse(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("cannot reopen {}: {e}", path.display()),
        }
    }
}

fn key(name: &str) -> KeySpec {
    KeySpec {
        name: Some(name.into()),
        role: Some("operator".into()),
        rate_limit: Some(Some("none".into())),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// A small Prometheus text-format parser
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
            s.parse().map_err(|e| format!("bad value {s:?}: {e}"))
        }
        _ => Err(format!("bad value {s:?}")),
    }
}

/// Parses `{a="x",b="y\"z"}`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("expected '=' in {rest:?}"))?;
        let name = rest[..eq].trim();
        if !is_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name:?}"));
        }
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' in {rest:?}"));
        }
    }
}

/// Parses the text exposition format, checking that every sample belongs to a family with a
/// `# TYPE` declared before it and that names and suffixes fit the type.
fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), help) => {
                    let text = help.unwrap_or("").to_string();
                    let repeated = e.helps.insert(name.to_string(), text).is_some();
                    if repeated || !is_metric_name(name) {
                        return Err(at("bad or repeated HELP".into()));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"]
                        .contains(&kind.trim())
                    {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if !is_metric_name(name)
                        || e.types
                            .insert(name.to_string(), kind.trim().to_string())
                            .is_some()
                    {
                        return Err(at("bad or repeated TYPE".into()));
                    }
                    if e.samples
                        .iter()
                        .any(|s| family_of(&s.name, &e.types).as_deref() == Some(name))
                    {
                        return Err(at("TYPE after samples of its family".into()));
                    }
                }
                (Some("TYPE"), ..) => return Err(at("TYPE without a type".into())),
                _ => {} // other comments are allowed
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &e.types)
            .ok_or_else(|| at(format!("sample {name} has no # TYPE for its family")))?;
        let kind = &e.types[&family];
        if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("histogram bucket without le".into()));
        }
        if kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        e.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(e)
}

/// The family a sample name belongs to: itself, or for histograms and summaries the name
/// without `_bucket` / `_sum` / `_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if let Some(kind) = types.get(name) {
        return (kind != "histogram").then(|| name.to_string());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            match types.get(base).map(String::as_str) {
                Some("histogram") => return Some(base.to_string()),
                Some("summary") if suffix != "_bucket" => return Some(base.to_string()),
                _ => {}
            }
        }
    }
    None
}

impl Exposition {
    /// The value of the one sample named `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one sample {name}{want:?}, found {found:?}"
        );
        found[0].value
    }
}

async fn scrape(admin: SocketAddr) -> Exposition {
    let a = get(admin, "/metrics", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let ct = a.headers["content-type"].to_str().unwrap();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content-type {ct}"
    );
    let text = String::from_utf8(a.body.to_vec()).expect("metrics are UTF-8");
    parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
}

#[test]
fn the_parser_rejects_what_prometheus_rejects() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    let e = parse_prometheus(good).unwrap();
    assert_eq!(e.value("a_total", &[("x", "1"), ("y", "q\"")]), 3.0);
    for bad in [
        "a_total 1\n",                               // no TYPE
        "# TYPE a counter\na{x=1} 1\n",              // unquoted label
        "# TYPE a counter\na one\n",                 // not a number
        "# TYPE a counter\na 1\n# TYPE a counter\n", // repeated TYPE
        "# TYPE h histogram\nh_bucket 1\n",          // bucket without le
        "# TYPE a gauge\na{x=\"1\" 1\n",             // unterminated labels
        "# TYPE a counter\na 1 2 3\n",               // trailing fields
        "# TYPE a wat\na 1\n",                       // unknown type
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. Counts by deployment, operation and status class
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn usage_is_counted_by_deployment_operation_and_status_class() {
    let up = start_upstream().await;
    let gw = start_gateway_with(|dir| {
        config_text(
            dir,
            "",
            &format!(
                "usage_flush_interval = \"1h\"\n\n\
                 [[deployments]]\nname = \"api\"\nupstream = \"http://{up}\"\npath_prefix = \"/api\"\n\
                 \x20 [[deployments.routes]]\n  name = \"status_check\"\n  path = \"/status\"\n\n\
                 [[deployments]]\nname = \"app\"\nupstream = \"echo\"\n{CREATE_SCENARIOS_ROUTE}"
            ),
        )
    })
    .await;
    let admin = gw
        .running
        .bootstrap_secret
        .clone()
        .expect("bootstrap admin key");
    let (id, secret) = gw.create_key(key("counted"));
    let (other_id, other) = gw.create_key(key("other"));
    let ua = "usage-test/1.0";
    let h: &[(&str, &str)] = &[("x-api-key", &secret), ("user-agent", ua)];
    let addr = gw.addr();

    let mut plan: Vec<(Method, &str, u16)> = Vec::new();
    plan.extend(std::iter::repeat_n((Method::GET, "/things", 200), 3)); // app, no rule → "GET", 2xx
    plan.extend(std::iter::repeat_n(
        (Method::POST, "/scenarios/new", 403),
        2,
    )); // app, rule without scope → 4xx
    plan.push((Method::POST, "/other", 200)); // app, no rule → "POST"
    plan.extend(std::iter::repeat_n(
        (Method::GET, "/api/status?code=503", 503),
        2,
    )); // api, rule → 5xx
    plan.push((Method::GET, "/api/status?code=302", 302)); // api, rule → 3xx
    plan.push((Method::DELETE, "/api/status?code=204", 204)); // api, rule (any method) → 2xx
    plan.push((Method::GET, "/api/hello", 200)); // api, no rule → "GET"
    for (method, path, status) in &plan {
        let a = send(addr, method.clone(), path, h, "").await;
        assert_eq!(a.status.as_u16(), *status, "{method} {path}: {a:?}");
        if *status == 403 {
            assert_eq!(a.code(), "insufficient_scope");
        }
    }
    let m = plan.len() as u64;
    // Not counted for the key: other keys, bad keys, unrouted paths are never its usage.
    assert_eq!(
        get(addr, "/things", &[("x-api-key", &other)]).await.status,
        200
    );
    assert_eq!(
        get(addr, "/things", &[("x-api-key", "kg_prod_nope")])
            .await
            .status,
        401
    );

    let expected = counts(&[
        ("app", "GET", "2xx", 3),
        ("app", "create_scenarios", "4xx", 2),
        ("app", "POST", "2xx", 1),
        ("api", "status_check", "5xx", 2),
        ("api", "status_check", "3xx", 1),
        ("api", "status_check", "2xx", 1),
        ("api", "GET", "2xx", 1),
    ]);
    assert_eq!(expected.values().sum::<u64>(), m);

    let usage = &gw.running.gateway.usage;
    assert_eq!(usage.pending(), m + 1, "both keys' requests are pending");
    assert!(
        stored_counts(&gw.running.store, &id).is_empty(),
        "nothing flushed yet with a 1h interval"
    );
    let report_url = format!("/v1/keys/{id}/usage?days=1");
    let before = get(gw.running.admin_addr, &report_url, &[("x-api-key", &admin)]).await;
    assert_eq!(before.status, 200, "{before:?}");

    assert_eq!(
        usage.flush().unwrap(),
        m + 1,
        "one flush writes every pending request"
    );
    assert_eq!(usage.pending(), 0);
    assert_eq!(
        stored_counts(&gw.running.store, &id),
        expected,
        "rows on disk"
    );
    assert_eq!(
        stored_counts(&gw.running.store, &other_id),
        counts(&[("app", "GET", "2xx", 1)])
    );
    let today = day_number(Utc::now().timestamp());
    assert_eq!(
        stored_days(&gw.running.store, &id),
        BTreeMap::from([(today, m)])
    );
    let last = stored_last_used(&gw.running.store, &id).expect("last use stored");
    assert_eq!(last["ip"], "127.0.0.1", "{last}");
    assert_eq!(last["user_agent"], ua, "{last}");

    let a = get(gw.running.admin_addr, &report_url, &[("x-api-key", &admin)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let r = a.json();
    assert_eq!(
        r,
        before.json(),
        "the report is the same before (from memory) and after the flush (from disk)"
    );
    assert_eq!(r["key_id"], id.as_str());
    assert_eq!(r["total"], m, "{r}");
    let days = r["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{r}");
    assert_eq!(days[0]["date"], Utc::now().date_naive().to_string(), "{r}");
    assert_eq!(days[0]["requests"], m);
    assert_eq!(r["avg_per_day"].as_f64(), Some(m as f64));
    assert_eq!(
        by_name(&r["by_deployment"]),
        BTreeMap::from([("app".into(), 6), ("api".into(), 5)]),
        "{r}"
    );
    assert_eq!(
        by_name(&r["by_operation"]),
        BTreeMap::from([
            ("GET".into(), 4),
            ("create_scenarios".into(), 2),
            ("POST".into(), 1),
            ("status_check".into(), 4)
        ]),
        "{r}"
    );
    // Ranked by requests, ties by name.
    let ops: Vec<&str> = r["by_operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        ["GET", "status_check", "create_scenarios", "POST"],
        "{r}"
    );
    let share_app = r["by_deployment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "app")
        .unwrap()["share"]
        .as_f64()
        .unwrap();
    assert!((share_app - 6.0 / 11.0).abs() < 0.001, "share {share_app}");
    assert_eq!(
        r["by_status"],
        serde_json::json!({"2xx": 6, "3xx": 1, "4xx": 2, "5xx": 2}),
        "{r}"
    );
    assert!(
        (r["error_rate"].as_f64().unwrap() - 4.0 / 11.0).abs() < 0.001,
        "{r}"
    );
    assert_eq!(r["last_used_ip"], "127.0.0.1");
    assert_eq!(r["last_used_user_agent"], ua);
    let at: DateTime<Utc> = r["last_used_at"].as_str().unwrap().parse().unwrap();
    assert!(
        (Utc::now() - at).num_seconds().abs() < 60,
        "last_used_at {at}"
    );

    // The key record shows the last use too.
    let shown = get(
        gw.running.admin_addr,
        &format!("/v1/keys/{id}"),
        &[("x-api-key", &admin)],
    )
    .await
    .json();
    assert_eq!(shown["key"]["last_used_ip"], "127.0.0.1", "{shown}");
    assert_eq!(shown["key"]["last_used_user_agent"], ua, "{shown}");
    assert_eq!(shown["usage"]["total"], m, "{shown}");

    // More traffic after the flush adds to the stored rows, in the report at once.
    assert_eq!(get(addr, "/things", h).await.status, 200);
    let r = get(gw.running.admin_addr, &report_url, &[("x-api-key", &admin)])
        .await
        .json();
    assert_eq!(r["total"], m + 1, "{r}");
    usage.flush().unwrap();
    assert_eq!(
        stored_counts(&gw.running.store, &id)
            [&("app".to_string(), "GET".to_string(), "2xx".to_string())],
        4
    );
}

#[tokio::test]
async fn the_background_flusher_writes_usage_without_being_asked() {
    let gw = start_gateway_with(|dir| {
        config_text(dir, "", "usage_flush_interval = \"50ms\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n")
    })
    .await;
    let (id, secret) = gw.create_key(key("bg"));
    for _ in 0..7 {
        assert_eq!(
            get(gw.addr(), "/x", &[("x-api-key", &secret)]).await.status,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let on_disk: u64 = stored_counts(&gw.running.store, &id).values().sum();
        if on_disk == 7 {
            break;
        }
        assert!(on_disk <= 7, "flushed more than was counted: {on_disk}");
        assert!(
            Instant::now() < deadline,
            "the flusher did not write within 20 s (on disk: {on_disk})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.running.gateway.usage.pending(), 0);
}

/// Nice values of this process's threads named `name` (Linux: /proc/self/task/*/stat).
fn thread_nice_values(name: &str) -> Vec<i64> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Fields after the parenthesised name start at field 3; nice is field 19.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn the_flush_runs_on_a_thread_at_the_lowest_cpu_priority() {
    let gw = start_gateway_with(|dir| {
        config_text(dir, "", "usage_flush_interval = \"50ms\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n")
    })
    .await;
    let (_, secret) = gw.create_key(key("nice"));
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &secret)]).await.status,
        200
    );
    // The thread lowers its own priority as it starts: wait (bounded) until it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nice = thread_nice_values("keygate-usage");
        if nice.contains(&19) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no keygate-usage thread at nice 19 within 20 s (seen: {nice:?})"
        );
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------
// 7. Graceful shutdown loses no count
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_flushes_every_count() {
    let gw = start_gateway_with(|dir| {
        config_text(dir, "", "usage_flush_interval = \"1h\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n")
    })
    .await;
    let (id, secret) = gw.create_key(key("shutdown"));
    const M: u64 = 23;
    for _ in 0..M {
        assert_eq!(
            get(gw.addr(), "/x", &[("x-api-key", &secret)]).await.status,
            200
        );
    }
    assert_eq!(gw.running.gateway.usage.pending(), M);
    assert!(
        stored_counts(&gw.running.store, &id).is_empty(),
        "only the final flush may write"
    );

    let TestGateway {
        running,
        dir,
        manager,
        ..
    } = gw;
    let path = running.store.path().to_path_buf();
    drop(manager);
    running.shutdown();
    tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("shutdown within 30 s");

    let store = Arc::new(reopen(&path).await);
    assert_eq!(
        stored_counts(&store, &id),
        counts(&[("app", "GET", "2xx", M)])
    );
    let usage = Usage::new(store).unwrap();
    let r = usage.report(&id, 1).unwrap();
    assert_eq!(r["total"], M, "{r}");
    assert_eq!(r["last_used_ip"], "127.0.0.1", "{r}");
    drop(dir);
}

// ---------------------------------------------------------------------------------------
// 8. kill -9 of the real binary loses at most one interval
// ---------------------------------------------------------------------------------------

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn kill_9_loses_at_most_one_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store_path: PathBuf = dir.path().join("keygate.redb");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [store]\npath = \"{}\"\nusage_flush_interval = \"200ms\"\n\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\n\
             [[deployments]]\nname = \"app\"\nupstream = \"echo\"\n",
            store_path.display()
        ),
    )
    .unwrap();

    // The key is made offline, before the gateway runs.
    let mut c = keygate(dir.path(), &config);
    c.args([
        "keys",
        "create",
        "--name",
        "killed",
        "--role",
        "operator",
        "--rate-limit",
        "none",
        "--json",
    ]);
    let created = run_command(c).ok().json();
    let id = created["key"]["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();

    let mut serve = Serve::start(keygate(dir.path(), &config)).await;
    let data = serve.addr;
    let admin = serve.listen_addr("admin API listening").await;

    const M: u64 = 40;
    for i in 0..M {
        let a = get(data, "/x", &[("x-api-key", &secret)]).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
    }

    // Wait (bounded) until the gateway says nothing counted is still waiting for the disk.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8(get(admin, "/metrics", &[]).await.body.to_vec()).unwrap();
        let counted = metric_value(
            &text,
            "keygate_requests_total{deployment=\"app\",status=\"2xx\"}",
        );
        assert_eq!(
            counted,
            Some(M as f64),
            "the gateway counted every request:\n{text}"
        );
        if metric_value(&text, "keygate_usage_pending_requests") == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage still pending after 30 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A few more requests inside the current interval, then the hard kill.
    const K: u64 = 5;
    for _ in 0..K {
        assert_eq!(get(data, "/x", &[("x-api-key", &secret)]).await.status, 200);
    }
    let status = serve.kill().await; // SIGKILL
    assert!(!status.success(), "killed, not exited: {status:?}");

    let store = Arc::new(reopen(&store_path).await);
    let usage = Usage::new(store.clone()).unwrap();
    let total = usage.report(&id, 1).unwrap()["total"].as_u64().unwrap();
    assert!((M..=M + K).contains(&total), "after kill -9: {total} on disk, expected every flushed request ({M}) and at most the last interval's {K} more");
    let on_disk: u64 = stored_counts(&store, &id).values().sum();
    assert_eq!(on_disk, total);
}

// ---------------------------------------------------------------------------------------
// 9. Delete removes usage, revoke keeps it
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_removes_usage_and_revoke_keeps_it() {
    let gw = start_gateway_with(|dir| {
        config_text(dir, "", "usage_flush_interval = \"1h\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n")
    })
    .await;
    let admin = gw
        .running
        .bootstrap_secret
        .clone()
        .expect("bootstrap admin key");
    let admin_addr = gw.running.admin_addr;
    let (revoked_id, revoked) = gw.create_key(key("revoked"));
    let (deleted_id, deleted) = gw.create_key(key("deleted"));
    for _ in 0..3 {
        assert_eq!(
            get(gw.addr(), "/x", &[("x-api-key", &revoked)])
                .await
                .status,
            200
        );
        assert_eq!(
            get(gw.addr(), "/x", &[("x-api-key", &deleted)])
                .await
                .status,
            200
        );
    }
    let usage = &gw.running.gateway.usage;
    usage.flush().unwrap();
    // Some usage of the doomed key still only in memory.
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &deleted)])
            .await
            .status,
        200
    );
    assert_eq!(usage.pending(), 1);
    let store = &gw.running.store;
    assert_eq!(stored_counts(store, &deleted_id).values().sum::<u64>(), 3);
    assert!(stored_last_used(store, &deleted_id).is_some());

    let a = send(
        admin_addr,
        Method::POST,
        &format!("/v1/keys/{revoked_id}/revoke"),
        &[("x-api-key", &admin)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = send(
        admin_addr,
        Method::DELETE,
        &format!("/v1/keys/{deleted_id}"),
        &[("x-api-key", &admin)],
        "",
    )
    .await;
    assert_eq!(a.status, 204, "{a:?}");

    assert!(
        stored_counts(store, &deleted_id).is_empty(),
        "a deleted key's rows are gone"
    );
    assert!(
        stored_last_used(store, &deleted_id).is_none(),
        "and its last use"
    );
    assert_eq!(usage.pending(), 0, "and its pending counts");
    usage.flush().unwrap();
    assert!(
        stored_counts(store, &deleted_id).is_empty(),
        "a later flush does not bring them back"
    );
    let a = get(
        admin_addr,
        &format!("/v1/keys/{deleted_id}/usage?days=7"),
        &[("x-api-key", &admin)],
    )
    .await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (404, "key_not_found"),
        "{a:?}"
    );

    assert_eq!(
        stored_counts(store, &revoked_id),
        counts(&[("app", "GET", "2xx", 3)]),
        "a revoked key's rows stay"
    );
    let r = get(
        admin_addr,
        &format!("/v1/keys/{revoked_id}/usage?days=7"),
        &[("x-api-key", &admin)],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = r.json();
    assert_eq!(r["total"], 3, "{r}");
    assert_eq!(
        r["days"].as_array().unwrap().len(),
        7,
        "zero days included: {r}"
    );
    assert_eq!(r["last_used_ip"], "127.0.0.1", "{r}");

    // Deleting through the key manager (CLI path) drops usage too.
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &admin)]).await.status,
        200
    );
    let admin_id = gw.manager.list(&Default::default()).unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    usage.flush().unwrap();
    assert!(!stored_counts(store, &admin_id).is_empty());
    gw.manager.delete(&revoked_id, &Actor::local()).unwrap();
    assert!(
        stored_counts(store, &revoked_id).is_empty(),
        "delete after revoke removes the rows"
    );
    assert!(
        !stored_counts(store, &admin_id).is_empty(),
        "other keys' rows stay"
    );
}

// ---------------------------------------------------------------------------------------
// 10. /metrics
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let gw = start_gateway("echo", "").await;
    let (_, secret) = gw.operator_key();
    let (_, once) = gw.create_key(KeySpec {
        name: Some("once".into()),
        role: Some("operator".into()),
        rate_limit: Some(Some("1/1m".into())),
        ..Default::default()
    });
    let admin = gw.running.admin_addr;
    let before = scrape(admin).await;
    // Every family is documented.
    for name in before.types.keys() {
        assert!(before.helps.contains_key(name), "no HELP for {name}");
    }

    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &secret)]).await.status,
        200
    );
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", "kg_prod_nope")])
            .await
            .status,
        401
    );
    assert_eq!(get(gw.addr(), "/x", &[]).await.status, 401);
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &once)]).await.status,
        200
    );
    assert_eq!(
        get(gw.addr(), "/x", &[("x-api-key", &once)]).await.status,
        429
    );

    let after = scrape(admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[("deployment", "app"), ("status", "2xx")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[("deployment", "app"), ("status", "4xx")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[("deployment", "app"), ("status", "5xx")]
        ),
        0.0
    );
    assert_eq!(delta("keygate_auth_total", &[("result", "ok")]), 2.0);
    assert_eq!(
        delta("keygate_auth_total", &[("result", "invalid_key")]),
        1.0
    );
    assert_eq!(
        delta("keygate_auth_total", &[("result", "missing_key")]),
        1.0
    );
    assert_eq!(
        delta("keygate_auth_total", &[("result", "rate_limited")]),
        1.0
    );
    assert_eq!(delta("keygate_rate_limited_total", &[]), 1.0);
    assert_eq!(after.types["keygate_requests_total"], "counter");
    assert_eq!(after.types["keygate_usage_pending_requests"], "gauge");
    assert_eq!(
        after.value("keygate_keys_loaded", &[]),
        3.0,
        "bootstrap admin + 2 keys"
    );
    assert!(after.value("keygate_usage_pending_requests", &[]) >= 0.0);

    // The latency histogram: cumulative buckets ending in +Inf == _count.
    let h = "keygate_upstream_latency_seconds";
    assert_eq!(after.types[h], "histogram");
    let buckets: Vec<(f64, f64)> = after
        .samples
        .iter()
        .filter(|s| s.name == format!("{h}_bucket"))
        .map(|s| (parse_value(&s.labels["le"]).unwrap(), s.value))
        .collect();
    assert!(buckets.len() >= 2, "{buckets:?}");
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "bucket bounds must increase: {buckets:?}");
        assert!(w[0].1 <= w[1].1, "buckets must be cumulative: {buckets:?}");
    }
    let (last_le, last_count) = *buckets.last().unwrap();
    assert_eq!(last_le, f64::INFINITY, "the last bucket is le=\"+Inf\"");
    let count = after.value(&format!("{h}_count"), &[]);
    assert_eq!(last_count, count);
    assert_eq!(
        count - before.value(&format!("{h}_count"), &[]),
        2.0,
        "two forwarded requests"
    );
    assert!(after.value(&format!("{h}_sum"), &[]) >= 0.0);
}

// ---------------------------------------------------------------------------------------
// 11. Retention
// ---------------------------------------------------------------------------------------

#[test]
fn pruning_removes_days_past_retention_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("u.redb")).unwrap());
    let usage = Usage::new(store.clone()).unwrap();
    let id = "key_0000000000000001";
    let state = usage.key_states().of_id(id);
    let dep: Arc<str> = Arc::from("app");
    let op = Operation::Method(Method::GET);
    let ua = HeaderValue::from_static("pruner");
    let now = Utc::now().timestamp();
    let day = 86_400;
    let hit = |ago_days: i64, status: u16| Hit {
        state: &state,
        deployment: &dep,
        operation: &op,
        status,
        now: now - ago_days * day,
        ip: "127.0.0.1".parse().unwrap(),
        user_agent: Some(&ua),
    };
    for (ago, n) in [(100, 3), (90, 2), (89, 4), (0, 5)] {
        for i in 0..n {
            usage.record(hit(ago, if i == 0 { 500 } else { 200 }));
        }
    }
    assert_eq!(usage.flush().unwrap(), 14);
    let today = day_number(now);
    assert_eq!(
        stored_days(&store, id),
        BTreeMap::from([
            (today - 100, 3),
            (today - 90, 2),
            (today - 89, 4),
            (today, 5)
        ])
    );
    assert_eq!(usage.report(id, 366).unwrap()["total"], 14);

    // 90 days kept: today and the 89 before it. Two rows (2xx, 5xx) per old day go.
    assert_eq!(usage.prune(90).unwrap(), 4);
    assert_eq!(
        stored_days(&store, id),
        BTreeMap::from([(today - 89, 4), (today, 5)])
    );
    let r = usage.report(id, 366).unwrap();
    assert_eq!(r["total"], 9, "{r}");
    assert_eq!(r["by_status"]["5xx"], 2, "{r}");
    assert_eq!(usage.report(id, 1).unwrap()["total"], 5);
    // Pruning again finds nothing; a later flush does not resurrect pruned days.
    assert_eq!(usage.prune(90).unwrap(), 0);
    assert_eq!(usage.flush().unwrap(), 0);
    assert_eq!(stored_days(&store, id).len(), 2);
}
