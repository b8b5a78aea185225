//! The compiled `keygate` binary as a child process: CLI commands run to completion within a
//! bound, and `keygate serve` with its output collected and its JSON log lines readable as
//! they come. Children are only ever signalled by their own process id.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

/// Longest a CLI command may take (the machine may be busy compiling).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a log line or the exit of a served gateway.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends a signal to a child process we started, by its id.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// `keygate --config <config>`, run in `dir` with stdin closed and without any keygate
/// variables from the outer environment.
pub fn keygate(dir: &Path, config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.arg("--config")
        .arg(config)
        .current_dir(dir)
        .stdin(Stdio::null());
    for var in [
        "KEYGATE_ADMIN_KEY",
        "KEYGATE_CONFIG",
        "KEYGATE_PEPPER",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

/// The outcome of one CLI run.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts a zero exit code.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        self
    }
}

/// Runs a command with stdin closed, collecting its output, within [`COMMAND_TIMEOUT`].
pub fn run_command(mut c: Command) -> Out {
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keygate");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => {
            let out = out.unwrap();
            Out {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            signal(pid, "KILL");
            panic!("keygate {c:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// A running `keygate serve`, killed (SIGKILL) when dropped so that a failing test leaves
/// nothing behind.
pub struct Serve {
    child: Option<Child>,
    pub pid: u32,
    /// The data-plane address from the `data plane listening` log line.
    pub addr: SocketAddr,
    /// Stdout lines as they come.
    lines: mpsc::UnboundedReceiver<String>,
    /// Everything written to stdout and stderr so far.
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Copies the lines of `stream` into `output` (and to `lines`) until it ends, on a thread
/// that lives as long as the stream, so the child never blocks on a full pipe.
fn pump(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            {
                let mut out = output.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
    })
}

impl Serve {
    /// Starts `c` with the `serve` command and waits for its `data plane listening` line.
    pub async fn start(mut c: Command) -> Serve {
        c.arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn keygate serve");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let readers = vec![
            pump(child.stdout.take().unwrap(), output.clone(), Some(tx)),
            pump(child.stderr.take().unwrap(), output.clone(), None),
        ];
        let mut serve = Serve {
            pid: child.id(),
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            lines,
            output,
            readers,
        };
        serve.addr = serve.listen_addr("data plane listening").await;
        serve
    }

    /// Everything written to stdout and stderr so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the next JSON log line whose `message` is `message`, within
    /// [`SERVE_TIMEOUT`]. Lines before it are passed over.
    pub async fn wait_for_log(&mut self, message: &str) -> Value {
        self.wait_for_log_where(&format!("the log line {message:?}"), |v| {
            v["message"] == message
        })
        .await
    }

    /// Waits for the next JSON log line matching `pred` (`what` names it in a failure),
    /// within [`SERVE_TIMEOUT`]. Lines before it are passed over.
    pub async fn wait_for_log_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + SERVE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if pred(&v) {
                            return v;
                        }
                    }
                }
                Ok(None) => panic!(
                    "keygate serve ended its output before {what}:\n{}",
                    self.output()
                ),
                Err(_) => panic!(
                    "timed out after {SERVE_TIMEOUT:?} waiting for {what}:\n{}",
                    self.output()
                ),
            }
        }
    }

    /// The `listen` address of the log line `message`: a loopback address with a port.
    pub async fn listen_addr(&mut self, message: &str) -> SocketAddr {
        let line = self.wait_for_log(message).await;
        let addr: SocketAddr = line["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line}"));
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{line}");
        addr
    }

    /// Sends SIGTERM, waits for the exit and the end of its output; returns the status.
    pub async fn stop(&mut self) -> ExitStatus {
        signal(self.pid, "TERM");
        self.wait_exit().await
    }

    /// Sends SIGKILL (`kill -9`), waits for the exit and the end of its output; returns the
    /// status.
    pub async fn kill(&mut self) -> ExitStatus {
        signal(self.pid, "KILL");
        self.wait_exit().await
    }

    /// Waits for the exit (within [`SERVE_TIMEOUT`]) and the end of its output; returns
    /// the status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("still running");
        let waited = tokio::time::timeout(
            SERVE_TIMEOUT,
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await;
        let Ok(joined) = waited else {
            // Not reaped yet, so the id is still this child's.
            signal(self.pid, "KILL");
            panic!(
                "keygate serve did not exit within {SERVE_TIMEOUT:?}:\n{}",
                self.output()
            );
        };
        let status = joined.unwrap().unwrap();
        let readers = std::mem::take(&mut self.readers);
        tokio::task::spawn_blocking(move || readers.into_iter().for_each(|r| r.join().unwrap()))
            .await
            .unwrap();
        status
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(self.pid, "KILL");
            let _ = child.wait();
        }
    }
}
