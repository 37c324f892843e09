//! What a connection may cost the server: how many are open at once, how
//! long a client may take to send a request's head and body, and how large
//! a body it may announce. Without these, idle or slow sockets (slowloris)
//! pile up until the process runs out of file descriptors and refuses every
//! agent.
//!
//! Both servers take connections through one `Admission`: a connection
//! beyond the bound is refused at once (HTTP gets a 503 that says why,
//! gRPC a closed connection), and each admitted one holds its permit until
//! it closes. HTTP is served here, by hyper with a header read timeout
//! (which also closes keep-alive connections left idle), a deadline on each
//! request's body and an early 413 for a declared length over the limit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The bytes after which a connection has said which protocol it speaks
/// (HTTP/2's preface is 24 bytes); until then, `header_read_timeout` holds.
const PROTOCOL_BYTES: usize = 24;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, both servers together.
    pub max_connections: usize,
    /// A request's head must arrive within this, counted from when the
    /// connection starts waiting for it (so an idle keep-alive connection
    /// closes after it too).
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this, counted from its head.
    pub body_read_timeout: Duration,
    /// Largest body a request may declare (`Content-Length`).
    pub max_body_bytes: usize,
}

/// The permits of every connection the process holds.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    limits: ConnectionLimits,
    open: Gauge,
    refused: Counter,
}

impl Admission {
    pub fn new(limits: ConnectionLimits, registry: &mut Registry) -> Self {
        let admission = Self {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            open: Gauge::default(),
            refused: Counter::default(),
        };
        registry.register(
            "ember_connections_open",
            "Connections open on the HTTP and Flight SQL servers",
            admission.open.clone(),
        );
        registry.register(
            "ember_connections_refused",
            "Connections refused because --max-connections were open",
            admission.refused.clone(),
        );
        admission
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// `io` with a permit, or `io` back when the bound is reached.
    pub fn admit<IO>(&self, io: IO) -> Result<Admitted<IO>, IO> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admitted {
                io,
                _permit: Permit {
                    _permit: permit,
                    open: self.open.clone(),
                }
                .opened(),
                read: 0,
                protocol_deadline: Some(Box::pin(tokio::time::sleep(
                    self.limits.header_read_timeout,
                ))),
            }),
            Err(_) => {
                self.refused.inc();
                Err(io)
            }
        }
    }
}

struct Permit {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Permit {
    fn opened(self) -> Self {
        self.open.inc();
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// An admitted connection: it holds its permit until it closes, and reads
/// fail once `header_read_timeout` passes before it has sent the bytes
/// that say which protocol it speaks (hyper's own timeout starts after).
pub struct Admitted<IO> {
    io: IO,
    _permit: Permit,
    read: usize,
    protocol_deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Admitted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.read += buf.filled().len() - before;
                if this.read >= PROTOCOL_BYTES {
                    this.protocol_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .protocol_deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header read timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Admitted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Admitted<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Descriptors the process keeps for everything but connections: blocks
/// being read and written, the metastore, logs.
const OTHER_DESCRIPTORS: u64 = 1024;

/// `wanted` connections, or fewer if the process cannot open that many
/// descriptors even after raising its soft limit to the hard one.
pub fn connections_within_descriptors(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted;
        }
        let needed = wanted as u64 + OTHER_DESCRIPTORS;
        if limit.rlim_cur < needed && limit.rlim_max > limit.rlim_cur {
            limit.rlim_cur = needed.min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            }
        }
    }
    let fits = limit.rlim_cur.saturating_sub(OTHER_DESCRIPTORS).max(1) as usize;
    if fits < wanted {
        tracing::warn!(
            wanted,
            fits,
            "--max-connections lowered to what the open-file limit leaves"
        );
    }
    wanted.min(fits)
}

/// Connections from `listener` that `admission` takes; the others are
/// closed at once (a gRPC client sees an unavailable server and retries).
pub fn admitted_incoming(
    listener: tokio::net::TcpListener,
    admission: Admission,
) -> impl futures::Stream<Item = io::Result<Admitted<tokio::net::TcpStream>>> {
    futures::stream::unfold((listener, admission), |(listener, admission)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => return Some((Err(e), (listener, admission))),
            };
            let _ = stream.set_nodelay(true);
            if let Ok(admitted) = admission.admit(stream) {
                return Some((Ok(admitted), (listener, admission)));
            }
        }
    })
}

/// Serves `app` on `listener` within `admission`'s limits until `shutdown`
/// completes, then lets open requests finish.
pub async fn serve_http<L: axum::serve::Listener>(
    mut listener: L,
    app: Router,
    admission: Admission,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = admission.limits();
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits,
        bounded_request,
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut shutdown => break,
        };
        let io = match admission.admit(io) {
            Ok(io) => io,
            Err(io) => {
                tokio::spawn(refuse(io, limits.max_connections));
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Tells a client over the connection bound why it is refused, and closes.
async fn refuse<IO: AsyncWrite + Unpin>(mut io: IO, max: usize) {
    let body = format!(
        "{{\"code\":\"unavailable\",\"message\":\"the server holds its most connections ({max}, --max-connections); retry\"}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Refuses a declared body over the limit before reading it, and gives the
/// body a deadline.
async fn bounded_request(
    State(limits): State<ConnectionLimits>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared.filter(|l| *l > limits.max_body_bytes as u64) {
        let message = format!(
            "the request declares {length} bytes, more than the limit of {}",
            limits.max_body_bytes
        );
        let body = serde_json::json!({ "code": "resource_exhausted", "message": message });
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CONNECTION, "close"),
            ],
            body.to_string(),
        )
            .into_response();
    }
    let (parts, body) = request.into_parts();
    let body = Body::new(DeadlineBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep_until(
            Instant::now() + limits.body_read_timeout,
        )),
        timeout: limits.body_read_timeout,
    });
    next.run(Request::from_parts(parts, body)).await
}

/// A request body that fails once its deadline passes unfinished.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Some(Err(axum::Error::new(format!(
                    "the request body did not arrive within {}s (--http-body-read-timeout-seconds)",
                    this.timeout.as_secs()
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
