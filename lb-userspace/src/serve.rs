//! The daemon's two listeners, the control socket and the metrics
//! endpoint, built to survive hostile local clients: a cap on open
//! connections (excess ones are closed at once, so they cost no
//! descriptor), a size cap and idle timeout per request, and accept loops
//! that log, back off and carry on after an error such as EMFILE.

use std::{
    convert::Infallible,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
};
use tracing::warn;

use crate::{
    api::{Request, Response},
    config::{DEFAULT_SOCKET_DIR, check_socket_path},
};

/// Control connections open at once; more are closed on accept.
pub const MAX_CONTROL_CONNECTIONS: usize = 64;
/// Longest request line on the control socket.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// A control connection that sends no complete request for this long is closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Metrics connections open at once.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// A scrape must send its headers within this, and be done within twice it.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// After an accept error, wait this long before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refusals and accept errors are logged at most this often per listener.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Admission for one listener: the connection cap, and rate-limited logs
/// of refusals and accept errors.
struct Gate {
    what: &'static str,
    limit: Arc<Semaphore>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Gate {
    fn new(what: &'static str, max: usize) -> Gate {
        Gate {
            what,
            limit: Arc::new(Semaphore::new(max)),
            last_log: None,
            unlogged: 0,
        }
    }

    fn log(&mut self, message: &str) {
        self.unlogged += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            warn!(listener = self.what, events = self.unlogged, "{message}");
            self.last_log = Some(Instant::now());
            self.unlogged = 0;
        }
    }

    /// A permit for an accepted connection, or `None`: over the cap, the
    /// caller drops the connection.
    fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let permit = self.limit.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.log("connection limit reached: closing new connections");
        }
        permit
    }

    /// After a failed accept (EMFILE, ENFILE, ENOBUFS...): log and back off.
    async fn accept_failed(&mut self, e: std::io::Error) {
        self.log(&format!("accept failed, retrying: {e}"));
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// Binds the control socket (mode 0600). Only a stale socket at the path is
/// replaced; any other file there, or a missing directory, is an error.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    check_socket_path(path).context("lb.control_socket")?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    if dir == Path::new(DEFAULT_SOCKET_DIR) && !dir.exists() {
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a previous lbd (the pin-path lock says none runs).
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Who sent a control request (SO_PEERCRED), for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
}

/// A control request on its way to the daemon loop, and where the answer goes.
pub type ControlRequest = (Request, Caller, oneshot::Sender<Response>);

/// Serves the control socket: requests go to the daemon loop through `tx`.
pub async fn serve_socket(listener: UnixListener, tx: mpsc::Sender<ControlRequest>) {
    let gate = Gate::new("control socket", MAX_CONTROL_CONNECTIONS);
    accept_loop(
        gate,
        || async { listener.accept().await.map(|(s, _)| s) },
        move |stream| control_connection(stream, tx.clone()),
    )
    .await
}

/// Accepts connections for ever: each admitted one is served by `serve`
/// on a task of its own, holding a permit of the gate until it is done.
async fn accept_loop<S, A, AF, H, HF>(mut gate: Gate, mut accept: A, serve: H)
where
    A: FnMut() -> AF,
    AF: std::future::Future<Output = std::io::Result<S>>,
    H: Fn(S) -> HF,
    HF: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let stream = match accept().await {
            Ok(stream) => stream,
            Err(e) => {
                gate.accept_failed(e).await;
                continue;
            }
        };
        let Some(permit) = gate.admit() else {
            continue;
        };
        let served = serve(stream);
        tokio::spawn(async move {
            served.await;
            drop(permit);
        });
    }
}

/// One control connection: JSON request lines, each answered by one line,
/// until the client closes, idles or sends a line over the size cap.
async fn control_connection(stream: tokio::net::UnixStream, tx: mpsc::Sender<ControlRequest>) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    let caller = Caller {
        uid: cred.uid(),
        pid: cred.pid(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let mut limited = limited;
        let read =
            tokio::time::timeout(CONTROL_IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)).await;
        let response = match read {
            Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Response::err(format!(
                "request longer than {MAX_REQUEST_BYTES} bytes: closing"
            )),
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((req, caller, rtx)).await.is_err() {
                        return;
                    }
                    rrx.await
                        .unwrap_or_else(|_| Response::err("daemon is shutting down"))
                }
                Err(e) => Response::err(format!("malformed request: {e}")),
            },
        };
        let mut text = serde_json::to_string(&response).unwrap_or_default();
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || line.len() > MAX_REQUEST_BYTES {
            return;
        }
    }
}

/// Binds the metrics endpoint (`ADDRESS:PORT`).
pub fn bind_metrics(address: &str) -> Result<TcpListener> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("lb.metrics_address: binding {address}"))?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// A scrape's request to the daemon loop, which reads the maps and answers
/// with the text exposition.
pub type Scrape = oneshot::Sender<String>;

/// Serves `GET /metrics`: each scrape asks the daemon loop through `scrapes`.
pub async fn serve_metrics(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let gate = Gate::new("metrics", MAX_METRICS_CONNECTIONS);
    accept_loop(
        gate,
        || async { listener.accept().await.map(|(s, _)| s) },
        move |stream| metrics_connection(stream, scrapes.clone()),
    )
    .await
}

/// One scrape: `GET /metrics` answered by the daemon loop, anything else 404.
async fn metrics_connection(stream: tokio::net::TcpStream, scrapes: mpsc::Sender<Scrape>) {
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let wanted = req.uri().path() == "/metrics";
        let scrapes = scrapes.clone();
        async move {
            let body = if wanted {
                let (tx, rx) = oneshot::channel();
                match scrapes.send(tx).await {
                    Ok(()) => rx.await.ok(),
                    Err(_) => None,
                }
            } else {
                None
            };
            let response = match (wanted, body) {
                (true, Some(body)) => hyper::Response::builder()
                    .header("Content-Type", crate::metrics::CONTENT_TYPE)
                    .body(Full::new(Bytes::from(body))),
                (true, None) => hyper::Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::from_static(b"lbd is shutting down\n"))),
                (false, _) => hyper::Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::from_static(b"try /metrics\n"))),
            };
            Ok::<_, Infallible>(response.expect("static response parts"))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(METRICS_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // Slow readers too: the whole exchange has a deadline.
    let _ = tokio::time::timeout(2 * METRICS_TIMEOUT, conn).await;
}
