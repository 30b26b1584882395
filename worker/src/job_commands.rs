//! `ionet job submit|status|logs|stop|list|delete`: a client of the head's job server
//! (Ray's Jobs REST API, `ionet_gcs::job_server`), as `ray job …` is of Ray's.
//!
//! The job server is found as `--address http(s)://HOST:PORT`, `IONET_JOB_SERVER_ADDRESS`,
//! else the one this machine's session's head serves; a TLS one is trusted through the
//! cluster CA (`IONET_CA_FILE`, else the session's). Requests carry `--api-key` (or
//! `IONET_API_KEY`): an account's key, whose jobs it submits and pays for; on the head's
//! machine the operator's credential is the default.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::cli::SessionArgs;
use crate::packages::PACKAGE_URI_SCHEME;
use crate::session::SessionDir;

/// How often a stopped job's status is read until it ended.
const FOLLOW_PASS: Duration = Duration::from_millis(200);

/// How a job command finds the job server and speaks to it.
#[derive(Debug, Args, Clone)]
pub struct JobServerArgs {
    /// The head's job server, http(s)://HOST:PORT (default: the one this machine's
    /// session's head serves).
    #[arg(long, env = "IONET_JOB_SERVER_ADDRESS")]
    pub address: Option<String>,
    /// An account's API key (`ionet account create NAME`): the account submits and pays.
    /// Default: the operator's credential in this machine's session directory.
    #[arg(long = "api-key", env = "IONET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Debug, Args, Clone)]
pub struct JobSubmitArgs {
    /// The submission's id (default: one is made up, `ionetsubmit_…`).
    #[arg(long = "submission-id")]
    pub submission_id: Option<String>,
    /// A local directory the job runs in: packed, uploaded once (by content) and
    /// unpacked on every node that runs the job (its entrypoint starts inside it, its
    /// workers too). Overrides the runtime environment's `working_dir`.
    #[arg(long = "working-dir")]
    pub working_dir: Option<PathBuf>,
    /// The runtime environment as JSON, e.g. '{"env_vars": {"MODE": "fast"}}'.
    #[arg(long = "runtime-env-json")]
    pub runtime_env_json: Option<String>,
    /// Metadata to keep with the job, as a JSON object of strings.
    #[arg(long = "metadata-json")]
    pub metadata_json: Option<String>,
    /// CPUs the entrypoint holds on its node (default 0, as Ray).
    #[arg(long = "entrypoint-num-cpus")]
    pub entrypoint_num_cpus: Option<f64>,
    /// GPUs the entrypoint holds on its node (default 0): reserved there for it, and
    /// metered, while it runs. The node is the cheapest that has them free.
    #[arg(long = "entrypoint-num-gpus", visible_alias = "gpus")]
    pub entrypoint_num_gpus: Option<f64>,
    /// The model of those GPUs, e.g. A100-80GB.
    #[arg(long = "gpu-type")]
    pub gpu_type: Option<String>,
    /// The most the node may ask per GPU-hour, in USD, e.g. 1.5 (none asks less: the job
    /// is refused, saying what the cheapest asks).
    #[arg(long = "max-price")]
    pub max_price: Option<f64>,
    /// Bytes of memory the entrypoint holds on its node.
    #[arg(long = "entrypoint-memory")]
    pub entrypoint_memory: Option<u64>,
    /// Custom resources the entrypoint holds, as JSON, e.g. '{"nvlink": 1}'.
    #[arg(long = "entrypoint-resources")]
    pub entrypoint_resources: Option<String>,
    /// Return once submitted, without following its output.
    #[arg(long = "no-wait")]
    pub no_wait: bool,
    #[command(flatten)]
    pub server: JobServerArgs,
    /// The entrypoint: a command line, after `--`.
    #[arg(last = true, required = true)]
    pub entrypoint: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub struct JobStatusArgs {
    /// The submission id.
    pub submission_id: String,
    /// Print the job's details as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: JobServerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct JobLogsArgs {
    /// The submission id.
    pub submission_id: String,
    /// Keep printing until the job ends.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub server: JobServerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct JobStopArgs {
    /// The submission id.
    pub submission_id: String,
    /// Return once asked, without waiting for the job to end.
    #[arg(long = "no-wait")]
    pub no_wait: bool,
    #[command(flatten)]
    pub server: JobServerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct JobListArgs {
    /// Print JSON (Ray's job details) for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: JobServerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct JobDeleteArgs {
    /// The submission id (a job that ended).
    pub submission_id: String,
    #[command(flatten)]
    pub server: JobServerArgs,
}

/// A client of one job server.
struct JobServer {
    base: String,
    client: reqwest::Client,
    credential: String,
    /// The cluster CA (PEM), when the server speaks TLS.
    ca: Option<String>,
}

impl JobServer {
    fn connect(args: &JobServerArgs) -> Result<Self> {
        let session = SessionDir::resolve(args.session.temp_dir.as_deref());
        let base = args.address.clone().or_else(|| session.job_server_address()).ok_or_else(|| {
            anyhow!(
                "no job server address: pass --address http(s)://HOST:PORT (the head's job server, port 8265 by \
                 default), or run this on the head's machine (none found in {})",
                session.path().display()
            )
        })?;
        let base = base.trim().trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("the job server address {base:?} needs its scheme: http://HOST:PORT or https://HOST:PORT");
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        let mut ca = None;
        if base.starts_with("https://") {
            let pem = session.cluster_ca_to_trust()?.ok_or_else(|| {
                anyhow!(
                    "{base} speaks TLS and this machine has not the cluster's CA: set IONET_CA_FILE to it (ca.pem in \
                     the head's session directory)"
                )
            })?;
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes()).context("the cluster CA")?;
            builder = builder.add_root_certificate(certificate);
            ca = Some(pem);
        }
        let credential = match &args.api_key {
            Some(key) if !key.trim().is_empty() => key.trim().to_string(),
            _ => session.admin_credential().map(|admin| admin.as_str().to_string()).ok_or_else(|| {
                anyhow!(
                    "no credential: pass --api-key (an account's key, `ionet account create NAME` on the head) or \
                     set IONET_API_KEY"
                )
            })?,
        };
        Ok(Self { base, client: builder.build()?, credential, ca })
    }

    /// Sends `method path` (with a JSON body); the JSON answer, or the server's error.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.clone(), &url).bearer_auth(&self.credential);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("cannot reach the job server at {}", self.base))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {}", text.trim());
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: the job server's answer is not JSON"))
    }

    /// Uploads `dir` packed (unless the head has it already); its URI for a runtime
    /// environment.
    async fn upload(&self, dir: &Path, excludes: &[String], under_own_name: bool) -> Result<String> {
        let package = crate::packages::package_directory(dir, excludes, under_own_name)?;
        let path = format!("/api/packages/gcs/{}", package.name);
        let url = format!("{}{path}", self.base);
        let known = self.client.get(&url).bearer_auth(&self.credential).send().await?;
        match known.status().as_u16() {
            200 => {
                eprintln!("{} is on the head already ({})", dir.display(), package.uri());
                return Ok(package.uri());
            }
            404 => {}
            status => bail!("GET {path}: {status}: {}", known.text().await.unwrap_or_default().trim()),
        }
        eprintln!(
            "Uploading {} ({} files, {:.1} MiB packed) as {}",
            dir.display(),
            package.files,
            package.bytes.len() as f64 / (1024.0 * 1024.0),
            package.uri()
        );
        let uri = package.uri();
        let body = with_progress(package.bytes);
        let sent = self.client.put(&url).bearer_auth(&self.credential).body(body).send().await?;
        if !sent.status().is_success() {
            bail!("uploading {}: {}: {}", dir.display(), sent.status(), sent.text().await.unwrap_or_default().trim());
        }
        Ok(uri)
    }

    /// `runtime_env` with its local directories (working_dir, py_modules) uploaded and
    /// named by their packages.
    async fn upload_local_dirs(&self, runtime_env: &mut Value) -> Result<()> {
        let excludes: Vec<String> = runtime_env["excludes"]
            .as_array()
            .map(|list| list.iter().filter_map(|item| item.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if let Some(dir) = runtime_env["working_dir"].as_str().filter(|dir| !dir.starts_with(PACKAGE_URI_SCHEME)) {
            let uri = self.upload(Path::new(dir), &excludes, false).await?;
            runtime_env["working_dir"] = Value::from(uri);
        }
        if let Some(modules) = runtime_env["py_modules"].as_array().cloned() {
            let mut uris = Vec::new();
            for module in modules {
                match module.as_str() {
                    Some(uri) if uri.starts_with(PACKAGE_URI_SCHEME) => uris.push(Value::from(uri)),
                    Some(dir) => uris.push(Value::from(self.upload(Path::new(dir), &excludes, true).await?)),
                    None => bail!("runtime_env py_modules holds {module}, not a directory or package"),
                }
            }
            runtime_env["py_modules"] = Value::from(uris);
        }
        Ok(())
    }

    async fn details(&self, id: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, &format!("/api/jobs/{id}"), None).await
    }

    /// Prints the job's output: what there is, or (`follow`) all of it as it is written
    /// until the job ends; the job's details at the end.
    async fn print_logs(&self, id: &str, follow: bool) -> Result<Value> {
        if follow {
            self.tail(id).await?;
        } else {
            let read = self.call(reqwest::Method::GET, &format!("/api/jobs/{id}/logs"), None).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(read["logs"].as_str().unwrap_or_default().as_bytes())?;
            out.flush()?;
        }
        self.details(id).await
    }

    /// Follows the job's output over the job server's WebSocket (Ray's `logs/tail`),
    /// printing it until the server closes it (the job ended and all of it came).
    async fn tail(&self, id: &str) -> Result<()> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let (scheme, authority) = self.base.split_once("://").expect("the address was checked to have a scheme");
        let url = format!("{}://{authority}/api/jobs/{id}/logs/tail", if scheme == "https" { "wss" } else { "ws" });
        let mut request = url.as_str().into_client_request().with_context(|| format!("the address {url}"))?;
        let bearer = format!("Bearer {}", self.credential).parse().context("the credential is not a header value")?;
        request.headers_mut().insert(reqwest::header::AUTHORIZATION, bearer);
        let reach = || format!("cannot reach the job server at {}", self.base);
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(authority))
            .await
            .map_err(|_| anyhow!("connecting took over 10 s"))
            .with_context(reach)?
            .with_context(reach)?;
        match &self.ca {
            Some(pem) => {
                let host = ionet_common::tls::host_of(authority).trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .with_context(|| format!("{host:?} is not a host name to check the certificate of"))?;
                let config = ionet_common::tls::http_client_config(pem)?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.with_context(reach)?;
                print_tail(request, tls, id).await
            }
            None => print_tail(request, tcp, id).await,
        }
    }
}

/// Prints what the WebSocket of `request` on `stream` carries until it closes.
async fn print_tail<S>(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    stream: S,
    id: &str,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_stream::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    let (mut socket, _) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(connected) => connected,
        Err(Error::Http(response)) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            bail!("GET /api/jobs/{id}/logs/tail: {}: {}", response.status(), body.trim());
        }
        Err(err) => return Err(err).context("following the job's output"),
    };
    // The server closes with "normal" once the job ended and all its output went (what
    // Ray's client checks too); anything else is a broken follow.
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    loop {
        let message = socket.next().await.ok_or_else(|| anyhow!("the job server's connection broke"));
        let text = match message?.context("following the job's output")? {
            Message::Text(text) => text.as_str().as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Close(Some(frame)) if frame.code == CloseCode::Normal => break,
            Message::Close(frame) => {
                bail!("the job server stopped following the job's output ({frame:?}): follow it again")
            }
            _ => continue,
        };
        let mut out = std::io::stdout().lock();
        out.write_all(&text)?;
        out.flush()?;
    }
    Ok(())
}

/// `bytes` as a request body that shows how much of it went (a bar on a terminal, a line
/// each quarter otherwise).
fn with_progress(bytes: Vec<u8>) -> reqwest::Body {
    use std::io::IsTerminal;
    const CHUNK: usize = 256 * 1024;
    let total = bytes.len().max(1);
    let terminal = std::io::stderr().is_terminal();
    let chunks: Vec<Vec<u8>> = bytes.chunks(CHUNK).map(<[u8]>::to_vec).collect();
    let (mut sent, mut shown) = (0usize, 0usize);
    let stream = futures::stream::iter(chunks.into_iter().map(move |chunk| {
        sent += chunk.len();
        let percent = sent * 100 / total;
        let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
        if terminal {
            let bar = "#".repeat(percent / 4);
            eprint!("\r  [{bar:<25}] {percent:>3}% of {:.1} MiB", mib(total));
            if sent >= total {
                eprintln!();
            }
        } else if percent >= shown + 25 || sent >= total {
            shown = percent - percent % 25;
            eprintln!("  uploaded {percent}% ({:.1} of {:.1} MiB)", mib(sent), mib(total));
        }
        Ok::<_, std::io::Error>(chunk)
    }));
    reqwest::Body::wrap_stream(stream)
}

fn is_terminal(details: &Value) -> bool {
    matches!(details["status"].as_str(), Some("STOPPED" | "SUCCEEDED" | "FAILED"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// A JSON object given on the command line.
fn json_object(flag: &str, text: Option<&str>) -> Result<Option<Value>> {
    let Some(text) = text else { return Ok(None) };
    let value: Value = serde_json::from_str(text).with_context(|| format!("{flag} is not JSON"))?;
    if !value.is_object() {
        bail!("{flag} must be a JSON object, not {value}");
    }
    Ok(Some(value))
}

/// The command line `words` as one shell line (each word quoted when it needs it).
fn shell_line(words: &[String]) -> String {
    words
        .iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&byte));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints how the job ended; an error when it did not succeed (the command's exit).
fn conclude(id: &str, details: &Value) -> Result<()> {
    let status = details["status"].as_str().unwrap_or("UNKNOWN");
    let message = details["message"].as_str().unwrap_or_default();
    eprintln!("Job '{id}' {}: {message}", status.to_ascii_lowercase());
    match status {
        "SUCCEEDED" => Ok(()),
        _ => bail!("job '{id}' ended {status}"),
    }
}

pub fn submit(args: JobSubmitArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    let mut request = serde_json::json!({ "entrypoint": shell_line(&args.entrypoint) });
    if let Some(id) = &args.submission_id {
        request["submission_id"] = Value::from(id.clone());
    }
    let mut runtime_env = json_object("--runtime-env-json", args.runtime_env_json.as_deref())?
        .unwrap_or_else(|| Value::Object(Default::default()));
    if let Some(dir) = &args.working_dir {
        runtime_env["working_dir"] = Value::from(dir.to_string_lossy().into_owned());
    }
    if let Some(metadata) = json_object("--metadata-json", args.metadata_json.as_deref())? {
        request["metadata"] = metadata;
    }
    if let Some(resources) = json_object("--entrypoint-resources", args.entrypoint_resources.as_deref())? {
        request["entrypoint_resources"] = resources;
    }
    if let Some(cpus) = args.entrypoint_num_cpus {
        request["entrypoint_num_cpus"] = Value::from(cpus);
    }
    if let Some(gpus) = args.entrypoint_num_gpus {
        request["entrypoint_num_gpus"] = Value::from(gpus);
    }
    if let Some(memory) = args.entrypoint_memory {
        request["entrypoint_memory"] = Value::from(memory);
    }
    if let Some(model) = &args.gpu_type {
        request["entrypoint_gpu_type"] = Value::from(model.clone());
    }
    if let Some(price) = args.max_price {
        request["entrypoint_max_price_per_gpu_hour"] = Value::from(price);
    }
    runtime()?.block_on(async {
        server.upload_local_dirs(&mut runtime_env).await?;
        request["runtime_env"] = runtime_env;
        let answer = server.call(reqwest::Method::POST, "/api/jobs/", Some(&request)).await?;
        let id = answer["submission_id"].as_str().ok_or_else(|| anyhow!("the job server named no submission"))?;
        eprintln!("Job '{id}' submitted successfully");
        if args.no_wait {
            println!("{id}");
            eprintln!("Query its status with `ionet job status {id}`, its output with `ionet job logs {id} --follow`");
            return Ok(());
        }
        let details = server.print_logs(id, true).await?;
        conclude(id, &details)
    })
}

pub fn status(args: JobStatusArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    runtime()?.block_on(async {
        let details = server.details(&args.submission_id).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&details)?);
        } else {
            let status = details["status"].as_str().unwrap_or("UNKNOWN");
            println!("Status for job '{}': {status}", args.submission_id);
            if let Some(message) = details["message"].as_str().filter(|message| !message.is_empty()) {
                println!("Status message: {message}");
            }
            let events = details["events"].as_array().cloned().unwrap_or_default();
            if !events.is_empty() {
                println!("Events:");
                let start = events[0]["time"].as_u64().unwrap_or_default();
                for event in events {
                    let at = event["time"].as_u64().unwrap_or(start).saturating_sub(start) as f64 / 1000.0;
                    println!("  +{at:>7.2}s  {}", event["message"].as_str().unwrap_or_default());
                }
            }
        }
        Ok(())
    })
}

pub fn logs(args: JobLogsArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    runtime()?.block_on(async { server.print_logs(&args.submission_id, args.follow).await.map(|_| ()) })
}

pub fn stop(args: JobStopArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    runtime()?.block_on(async {
        let id = &args.submission_id;
        let answer = server.call(reqwest::Method::POST, &format!("/api/jobs/{id}/stop"), None).await?;
        if answer["stopped"].as_bool() != Some(true) {
            let details = server.details(id).await?;
            println!("Job '{id}' was not running (it is {})", details["status"].as_str().unwrap_or("UNKNOWN"));
            return Ok(());
        }
        eprintln!("Stopping job '{id}'");
        if args.no_wait {
            return Ok(());
        }
        loop {
            let details = server.details(id).await?;
            if is_terminal(&details) {
                println!("Job '{id}' {}", details["status"].as_str().unwrap_or_default().to_ascii_lowercase());
                return Ok(());
            }
            tokio::time::sleep(FOLLOW_PASS).await;
        }
    })
}

pub fn list(args: JobListArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    runtime()?.block_on(async {
        let jobs = server.call(reqwest::Method::GET, "/api/jobs/", None).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&jobs)?);
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:<30} {:<10} {:<12} ENTRYPOINT", "SUBMISSION", "STATUS", "ACCOUNT")?;
        for job in jobs.as_array().into_iter().flatten() {
            writeln!(
                out,
                "{:<30} {:<10} {:<12} {}",
                job["submission_id"].as_str().unwrap_or("-"),
                job["status"].as_str().unwrap_or("-"),
                job["account"].as_str().unwrap_or("-"),
                job["entrypoint"].as_str().unwrap_or_default()
            )?;
        }
        Ok(())
    })
}

pub fn delete(args: JobDeleteArgs) -> Result<()> {
    let server = JobServer::connect(&args.server)?;
    runtime()?.block_on(async {
        let id = &args.submission_id;
        server.call(reqwest::Method::DELETE, &format!("/api/jobs/{id}"), None).await?;
        println!("Job '{id}' deleted");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entrypoint_keeps_its_words_through_the_shell() {
        let words = ["python", "-c", "print('a b')", "--flag=x", ""].map(String::from);
        assert_eq!(shell_line(&words), r#"python -c 'print('\''a b'\'')' --flag=x ''"#);
    }
}
