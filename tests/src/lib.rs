//! Helpers for cellmail's end-to-end tests and benchmark harness: find the built binaries,
//! run `cellmail up` as a child process on free ports, and talk to it only through its
//! public gRPC APIs. [`services`] finds etcd and runs private ones, [`emulator`] reaches the
//! AWS emulator and [`ses_standin`] answers the SES calls it lacks, [`pki`] issues the
//! certificates of the processes a test starts;
//! [`bench`] is the benchmark harness behind `cellmail-bench`.

pub mod bench;
pub mod dns;
pub mod emulator;
pub mod local;
pub mod pki;
pub mod processes;
pub mod receiver;
pub mod services;
pub mod ses_standin;

use std::io::{BufRead, BufReader};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cellmail_proto::bearer::Bearer;
use cellmail_proto::v1::{self, control_client::ControlClient, sender_client::SenderClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A binary of this workspace, built next to the test executables (the README's test
/// command builds them first). Fails loudly when it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target dir")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `check` until it returns `Some`, at most `timeout`.
pub async fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `cellmail up` running as a child process; killed when dropped.
pub struct Platform {
    child: Child,
    pub data_dir: PathBuf,
    pub router: String,
    pub control: String,
    /// `http://host:port` of the tracking host.
    pub tracking: String,
}

impl Platform {
    /// Starts `cellmail up` on free ports with `data_dir` and waits until it is ready.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// [`Platform::start`] with extra environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("cellmail")?)
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--router-addr",
                "127.0.0.1:0",
                "--control-addr",
                "127.0.0.1:0",
                "--tracking-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting cellmail up")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut router, mut control, mut tracking) = (None, None, None);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .context("cellmail up did not print `ready` within 30s")?;
            let addr = || {
                line.split_whitespace()
                    .nth(1)
                    .map(|a| format!("http://{a}"))
            };
            if line.starts_with("router:") {
                router = addr();
            } else if line.starts_with("control:") {
                control = addr();
            } else if line.starts_with("tracking:") {
                tracking = addr();
            } else if line.starts_with("ready") {
                break;
            }
        }
        Ok(Self {
            child,
            data_dir: data_dir.to_owned(),
            router: router.context("no router address printed")?,
            control: control.context("no control address printed")?,
            tracking: tracking.context("no tracking address printed")?,
        })
    }

    /// SIGKILL: no clean shutdown, as in a crash.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Some(exit) = self.child.try_wait()? {
                break exit;
            }
            // Dropping `self` kills it.
            anyhow::ensure!(
                Instant::now() < deadline,
                "cellmail up did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        anyhow::ensure!(exit.success(), "cellmail up exited with {exit}");
        Ok(())
    }

    /// The operators' credential `cellmail up` created in the data dir.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("admin-token"))?
            .trim()
            .to_owned())
    }

    pub async fn control(&self) -> anyhow::Result<Control> {
        control_client(&self.control, &self.admin_token()?).await
    }

    pub async fn sender(&self) -> anyhow::Result<SenderClient<Channel>> {
        Ok(SenderClient::connect(self.router.clone()).await?)
    }

    /// Creates a tenant; returns (cell, api key).
    pub async fn create_tenant(
        &self,
        id: &str,
        domains: &[&str],
    ) -> anyhow::Result<(String, String)> {
        let request = v1::CreateTenantRequest {
            id: id.to_owned(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            tier: String::new(),
            policy: None,
            ..Default::default()
        };
        let created = self
            .control()
            .await?
            .create_tenant(request)
            .await?
            .into_inner();
        Ok((
            created.tenant.context("no tenant in answer")?.cell,
            created.api_key,
        ))
    }

    /// Runs the CLI against this platform's control plane and parses its `--json` output.
    pub fn cli(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend([
            "--control",
            self.control.trim_start_matches("http://"),
            "--json",
        ]);
        cellmail(self, &all)
    }

    /// The .eml files the file sink wrote for `tenant`.
    pub fn mail_of(&self, tenant: &str) -> Vec<PathBuf> {
        let dir = self.data_dir.join("mail").join(tenant);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI as an operator of `platform` and parses its JSON output.
pub fn cellmail(platform: &Platform, args: &[&str]) -> serde_json::Value {
    let token = platform.admin_token().unwrap();
    cellmail_with(&[("CELLMAIL_ADMIN_TOKEN", &token)], args)
}

/// Runs the CLI with `env` and parses its JSON output.
pub fn cellmail_with(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("cellmail").unwrap())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cellmail {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "cellmail {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A `Control` client presenting the admin token.
pub type Control = ControlClient<InterceptedService<Channel, Bearer>>;

pub async fn control_client(endpoint: &str, admin_token: &str) -> anyhow::Result<Control> {
    let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
    Ok(ControlClient::with_interceptor(
        channel,
        Bearer::new(admin_token)?,
    ))
}

/// A request with `key` as its bearer token.
pub fn authorized<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Tenant `key`'s message `id`, through the router.
pub async fn get_message(
    sender: &SenderClient<Channel>,
    key: &str,
    id: &str,
) -> Result<v1::MessageStatus, tonic::Status> {
    let request = v1::GetMessageRequest {
        message_id: id.to_owned(),
    };
    let status = sender.clone().get_message(authorized(key, request)).await?;
    Ok(status.into_inner())
}

/// A valid transactional message from `from` to `to`.
pub fn message(from: &str, to: &str, idempotency_key: &str) -> v1::SendRequest {
    v1::SendRequest {
        idempotency_key: idempotency_key.to_owned(),
        message_class: v1::MessageClass::Transactional as i32,
        from_address: from.to_owned(),
        to: vec![to.to_owned()],
        subject: "Your receipt".to_owned(),
        text: "Thanks for your order.".to_owned(),
        ..Default::default()
    }
}

/// The body of `GET http://<authority><path>`, which must answer 200 (the test services'
/// and the binaries' plain HTTP endpoints; HTTP/1.1 with `Connection: close`).
pub async fn http_get(authority: &str, path: &str) -> anyhow::Result<String> {
    let (head, body) = http(authority, "GET", path).await?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body)
}

/// Serves HTTP/1.1 on `listener` in the background, each request answered by `answer`: the
/// tests' own servers (a webhook receiver, the SES stand-in).
pub fn serve_http<F, Fut>(listener: tokio::net::TcpListener, answer: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = anyhow::Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>>,
        > + Send
        + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(answer.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
}

/// One plain HTTP/1.1 request without a body: the response's head (status line and
/// headers) and its body.
pub async fn http(authority: &str, method: &str, path: &str) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    Ok((head.to_owned(), body.to_owned()))
}

/// Runs `attempt` until it succeeds or `timeout` has passed (50 ms apart) and returns its last
/// result: for calls that fail until another process has caught up (a cell registering, a
/// router seeing a new tenant).
pub async fn until_ok<T, E, Fut>(
    timeout: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let result = attempt().await;
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router answers `key`'s tenant (it has seen the tenant and its key in the
/// registry), through a call that is not a send, so nothing is counted or queued.
pub async fn until_router_serves(sender: &SenderClient<Channel>, key: &str) {
    until_ok(Duration::from_secs(10), || {
        let mut sender = sender.clone();
        let request = authorized(key, v1::GetStatsRequest::default());
        async move { sender.get_stats(request).await }
    })
    .await
    .unwrap_or_else(|status| panic!("the router never served the new tenant: {status:?}"));
}

/// Sends `request` until it is accepted, retrying what a client is told to retry (UNAVAILABLE,
/// and a "moved" answer should one reach it) with the same idempotency key; returns the
/// message id and how many attempts were retried.
pub async fn send_retrying(
    sender: &SenderClient<Channel>,
    key: &str,
    request: v1::SendRequest,
) -> (String, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut retries = 0;
    loop {
        match sender.clone().send(authorized(key, request.clone())).await {
            Ok(sent) => return (sent.into_inner().message_id, retries),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    || cellmail_proto::ApiError::is_moved(&status) =>
            {
                retries += 1;
                assert!(
                    Instant::now() < deadline,
                    "still refused after {retries} tries: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{}: {status:?}", request.idempotency_key),
        }
    }
}

/// (idempotency key -> times sent) of the .eml files in `dir`.
pub fn keys_in(dir: &std::path::Path) -> std::collections::HashMap<String, usize> {
    let mut keys = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let raw = std::fs::read(entry.path()).unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
        let key = parsed
            .header_raw("X-Cellmail-Idempotency-Key")
            .unwrap_or_default()
            .trim()
            .to_owned();
        *keys.entry(key).or_default() += 1;
    }
    keys
}

/// Waits (20 s at most) until `n` registered cells are as `wanted` says; returns them all.
pub async fn cells_until(
    control: &Control,
    wanted: impl Fn(&v1::CellInfo) -> bool,
    n: usize,
) -> Vec<v1::CellInfo> {
    let cells = until_ok(Duration::from_secs(20), || {
        let mut control = control.clone();
        let wanted = &wanted;
        async move {
            let cells = control
                .list_cells(v1::ListCellsRequest {})
                .await?
                .into_inner()
                .cells;
            match cells.iter().filter(|c| wanted(c)).count() {
                found if found == n => Ok(cells),
                found => Err(tonic::Status::unavailable(format!(
                    "{found} of {n} cells as wanted: {cells:?}"
                ))),
            }
        }
    })
    .await;
    cells.unwrap()
}
