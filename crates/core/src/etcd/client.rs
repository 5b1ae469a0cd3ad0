//! The connection to the cluster: the process-wide runtime, the etcd client, and every request
//! bounded by the request timeout, retried across members while time remains, with etcd's and
//! tonic's errors mapped to the crate's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, KvClient, LeaseClient, WatchClient};
use tonic::codegen::{http, Service};
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

use super::url::ClusterUrl;
use super::ClusterOptions;

/// etcd's default `--max-request-bytes` (1.5 MiB): a request larger than this is refused.
pub const MAX_REQUEST_BYTES: usize = 3 << 19;
/// Room kept in a request for everything but the record itself (keys, compares, framing).
pub const REQUEST_OVERHEAD: usize = 16 << 10;
/// Responses (a page of the prefix, a watch batch) may be larger than tonic's 4 MiB default.
const MAX_DECODING_BYTES: usize = 256 << 20;
/// Keys per page when a range is read whole.
const PAGE: i64 = 2000;

/// The runtime of every etcd core in the process: two worker threads, made on first use.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvstore-etcd")
            .enable_all()
            .build()
            .expect("start the etcd runtime")
    })
}

/// Runs `fut` to completion from a thread outside the runtime. A runtime thread (a callback of
/// this backend) must not block: that is refused, naming `what`.
pub(crate) fn block_on<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    refuse_on_runtime(what)?;
    runtime().block_on(fut)
}

/// A blocking call on a runtime thread would wait for the thread it blocks: refused.
pub(crate) fn refuse_on_runtime(what: &str) -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::invalid(format!(
            "cannot {what} and wait inside a callback of the etcd backend (or any tokio \
             runtime thread); use the callback-taking calls or another thread"
        )));
    }
    Ok(())
}

/// Whether a failed request may have changed something in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// A read, or a write known not to have been applied.
    Nothing,
    /// A write that was sent and may have been applied.
    Unknown,
}

/// How to treat an error from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No member answered, the leader changed, no quorum: worth trying again.
    Transient,
    Denied,
    TooLarge,
    NoSpace,
    Compacted,
    Other,
}

/// The error with everything it wraps, for a message that names the real cause (a refused
/// certificate, a refused connection).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

pub(crate) fn classify(err: &etcd_client::Error) -> (Kind, String) {
    use etcd_client::Error as E;
    use tonic::Code;
    match err {
        E::GRpcStatus(status) => {
            let message = status.message().to_string();
            let lower = message.to_lowercase();
            let kind = if lower.contains("compacted") {
                Kind::Compacted
            } else if lower.contains("too many requests")
                || lower.contains("too many active requests")
            {
                // etcd's rate limit ("etcdserver: too many requests", ResourceExhausted, when
                // the applied index lags the committed one) and a full connection: later, or
                // another member, answers.
                Kind::Transient
            } else if lower.contains("request is too large")
                || lower.contains("too many operations")
                || lower.contains("message length too large")
                || lower.contains("larger than max")
            {
                Kind::TooLarge
            } else if lower.contains("database space exceeded") {
                Kind::NoSpace
            } else if lower.contains("authentication failed")
                || lower.contains("permission denied")
                || lower.contains("invalid auth token")
                || lower.contains("user name is empty")
                || lower.contains("authentication is not enabled")
            {
                Kind::Denied
            } else {
                match status.code() {
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Aborted => Kind::Transient,
                    Code::PermissionDenied | Code::Unauthenticated => Kind::Denied,
                    // A size limit says so in its message (matched above); any other
                    // exhausted resource (a rate limit, a quota of streams) passes.
                    Code::ResourceExhausted => Kind::Transient,
                    Code::Unknown if lower.contains("transport") || lower.contains("connect") => {
                        Kind::Transient
                    }
                    _ => Kind::Other,
                }
            };
            let detail = match std::error::Error::source(status) {
                Some(source) => format!("{message} ({})", chain(source)),
                None => message,
            };
            // A refused certificate does not get better by trying again.
            let kind = if kind == Kind::Transient && detail.to_lowercase().contains("certificate") {
                Kind::Other
            } else {
                kind
            };
            (kind, detail)
        }
        E::TransportError(e) => {
            let detail = chain(e);
            let kind = if detail.to_lowercase().contains("certificate") {
                Kind::Other
            } else {
                Kind::Transient
            };
            (kind, detail)
        }
        E::IoError(e) => (Kind::Transient, chain(e)),
        E::LeaseKeepAliveError(e) | E::WatchError(e) => (Kind::Transient, e.clone()),
        other => (Kind::Other, chain(other)),
    }
}

/// The crate's error for a failed request about `what`.
pub(crate) fn map_error(err: &etcd_client::Error, what: &str, effect: Effect) -> Error {
    let (kind, detail) = classify(err);
    match kind {
        Kind::Denied => Error::PermissionDenied {
            message: format!("etcd refused {what}: {detail}"),
        },
        Kind::TooLarge => Error::invalid(format!(
            "etcd refused {what} as too large ({detail}); the cluster's request limit is \
             --max-request-bytes (1.5 MiB by default) and at most 128 operations per transaction"
        )),
        Kind::NoSpace => Error::Io {
            errno: None,
            message: format!(
                "etcd refused {what}: the cluster is out of space ({detail}); compact and \
                 defragment it, or raise --quota-backend-bytes"
            ),
        },
        Kind::Transient | Kind::Compacted | Kind::Other => unavailable(what, effect, &detail),
    }
}

/// The key-values of each Get of a transaction's taken branch, in order.
pub(crate) fn txn_gets(answer: &etcd_client::TxnResponse) -> Vec<Vec<etcd_client::KeyValue>> {
    answer
        .op_responses()
        .into_iter()
        .map(|op| match op {
            etcd_client::TxnOpResponse::Get(mut get) => get.take_kvs(),
            _ => Vec::new(),
        })
        .collect()
}

/// The value of the first key of each Get of a transaction's taken branch, in order.
pub(crate) fn txn_first_values(answer: &etcd_client::TxnResponse) -> Vec<Option<Vec<u8>>> {
    txn_gets(answer)
        .into_iter()
        .map(|kvs| kvs.first().map(|kv| kv.value().to_vec()))
        .collect()
}

pub(crate) fn unavailable(what: &str, effect: Effect, detail: &str) -> Error {
    let outcome = match effect {
        Effect::Nothing => "nothing was written",
        Effect::Unknown => "its outcome is unknown (it may or may not have been written)",
    };
    Error::Unavailable {
        message: format!("etcd did not complete {what} ({detail}); {outcome}"),
    }
}

/// The connections to the members: one (lazy) connection per member, and every request of
/// the core goes to one of them, the pinned member, until a request to it fails: then to the
/// next. (etcd-client's own balancing picks between every connected member at random, so a
/// stopped member, whose port still accepts connections, kept getting a share of the requests,
/// each waiting until the request timeout.)
struct Members {
    /// By member; emptied by [`Cluster::close`], which drops the connections.
    channels: RwLock<Vec<Channel>>,
    count: usize,
    pinned: AtomicUsize,
}

impl Members {
    fn pinned(&self) -> usize {
        self.pinned.load(Ordering::SeqCst)
    }

    /// Member `i`'s channel; None once closed.
    fn channel(&self, i: usize) -> Option<Channel> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        channels.get(i).cloned()
    }

    fn is_closed(&self) -> bool {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// A request to member `i` failed (the connection broke, a ping went unanswered, the member
    /// has no leader): the next requests go to the next member, unless another failure moved
    /// the pin already.
    fn failed(&self, i: usize) {
        let next = (i + 1) % self.count;
        let _ = self
            .pinned
            .compare_exchange(i, next, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The channel under etcd-client's clients: sends each request to the pinned member.
#[derive(Clone)]
struct Router {
    members: Arc<Members>,
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;
type Routed =
    Pin<Box<dyn Future<Output = std::result::Result<HttpResponse, tower::BoxError>> + Send>>;

impl Service<HttpRequest> for Router {
    type Response = HttpResponse;
    type Error = tower::BoxError;
    type Future = Routed;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        // Readiness is the member's, awaited in `call` once the member is chosen.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        let members = self.members.clone();
        Box::pin(async move {
            let i = members.pinned();
            let Some(mut channel) = members.channel(i) else {
                return Err(Box::new(tonic::Status::cancelled(
                    "the store's connection to etcd is closed",
                )) as tower::BoxError);
            };
            let answer = async {
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                channel.call(request).await
            }
            .await;
            // A transport failure (no connection, a broken one, an unanswered keep-alive
            // ping); an answer with a gRPC error status is judged by `Cluster::call`.
            answer.map_err(|err| {
                members.failed(i);
                Box::new(err) as tower::BoxError
            })
        })
    }
}

/// How long a ping's answer may take: a member that stopped answering (a stopped process, a
/// dead host) is dropped this long after a ping, well within the request timeout.
fn ping_timeout(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// How often an open connection with requests or streams on it is pinged when nothing else
/// arrives. etcd counts a ping less than 5 s after the last one as a strike unless it sent data
/// in between, and closes the connection ("too many pings") at the third: the session's
/// keep-alive answers (every TTL/3) are the data of an idle store, so at most three pings may
/// fall between two of them. At least the ping timeout, and TTL/10.
fn ping_interval(timeout: Duration, session_ttl: Duration) -> Duration {
    let ttl = Duration::from_secs(session_ttl.as_millis().div_ceil(1000).max(1) as u64);
    ping_timeout(timeout).max(ttl / 10)
}

/// The cluster client of one core.
#[derive(Clone)]
pub(crate) struct Cluster {
    pub kv: KvClient,
    pub watch: WatchClient,
    pub lease: LeaseClient,
    pub timeout: Duration,
    members: Arc<Members>,
}

impl Cluster {
    pub async fn connect(url: &ClusterUrl, options: &ClusterOptions) -> Result<Cluster> {
        let timeout = options.request_timeout;
        let ping = ping_interval(timeout, options.session_ttl);
        let mut connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((user, password)) = &options.auth {
            connect = connect.with_user(user.clone(), password.clone());
        }
        let mut tls = None;
        if url.tls {
            let mut config = etcd_client::TlsOptions::new();
            if let Some(tls_options) = &options.tls {
                if let Some(ca) = &tls_options.ca {
                    config = config.ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));
                }
                match (&tls_options.cert, &tls_options.key) {
                    (Some(cert), Some(key)) => {
                        config = config
                            .identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()))
                    }
                    (None, None) => {}
                    _ => {
                        return Err(Error::invalid(
                            "tls.cert and tls.key must be given together",
                        ))
                    }
                }
            }
            tls = Some(config);
        } else if options.tls.is_some() {
            return Err(Error::invalid(
                "tls options need an etcds:// URL (etcd:// connects without TLS)",
            ));
        }
        let what = format!("the connection to {}", url.endpoints.join(","));
        let mut channels = Vec::new();
        for address in url.client_endpoints() {
            let endpoint = Endpoint::from_shared(address.clone())
                .map_err(|e| Error::invalid(format!("etcd endpoint {address}: {e}")))?;
            let endpoint = match &tls {
                Some(config) => endpoint.tls_config(config.clone()).map_err(|e| {
                    Error::invalid(format!("etcd endpoint {address}: {}", chain(&e)))
                })?,
                None => endpoint,
            };
            let endpoint = endpoint
                .connect_timeout(timeout.min(ping * 5))
                .http2_keep_alive_interval(ping)
                .keep_alive_timeout(ping_timeout(timeout))
                // Pings only while requests or streams are open: etcd answers pings on an idle
                // connection with "too many pings" and closes it.
                .keep_alive_while_idle(false);
            channels.push(endpoint.connect_lazy());
        }
        let members = Arc::new(Members {
            count: channels.len(),
            channels: RwLock::new(channels),
            pinned: AtomicUsize::new(0),
        });
        let router = Router {
            members: members.clone(),
        };
        let channel = etcd_client::Channel::Custom(tower::util::BoxCloneSyncService::new(router));
        let client =
            match tokio::time::timeout(timeout, Client::from_channel(channel, Some(connect))).await
            {
                Ok(Ok(client)) => client,
                Ok(Err(err)) => return Err(map_error(&err, &what, Effect::Nothing)),
                Err(_) => {
                    return Err(unavailable(
                        &what,
                        Effect::Nothing,
                        &format!("no answer within {timeout:?}"),
                    ))
                }
            };
        Ok(Cluster {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_DECODING_BYTES),
            lease: client.lease_client(),
            timeout,
            members,
        })
    }

    /// Drops the connections to every member now (in-flight requests and open streams on them
    /// fail), whoever still holds a clone of this cluster or of its clients: requests made
    /// after this fail at once ([`Cluster::call`]: `StoreClosed`).
    pub fn close(&self) {
        let channels = std::mem::take(
            &mut *self
                .members
                .channels
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        drop(channels);
    }

    /// Runs `attempt` until it succeeds, fails for good, or the request timeout has passed
    /// since the first try; transient failures (a member gone, a leader election) are tried
    /// again, on whichever member answers. `effect` is what a failure of a write may have done.
    pub async fn call<T, F, Fut>(&self, what: &str, effect: Effect, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(20);
        let mut last = String::from("no answer");
        loop {
            if self.members.is_closed() {
                return Err(Error::StoreClosed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable(
                    what,
                    effect,
                    &format!("no answer within {:?}; last: {last}", self.timeout),
                ));
            }
            let member = self.members.pinned();
            match tokio::time::timeout(left, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => {
                    let (kind, detail) = classify(&err);
                    if kind != Kind::Transient {
                        return Err(map_error(&err, what, effect));
                    }
                    // The next attempt goes to another member (this one may have no leader, be
                    // cut off or be overloaded). Resending is what this loop always did on a
                    // transient failure; only where to has changed.
                    self.members.failed(member);
                    last = detail;
                }
                Err(_) => {
                    // The next call tries another member first.
                    self.members.failed(member);
                    return Err(unavailable(
                        what,
                        effect,
                        &format!("no answer within {:?}; last: {last}", self.timeout),
                    ));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Reads `[start, end)` page by page at one revision; returns that revision.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        mut each: impl FnMut(&etcd_client::KeyValue),
    ) -> Result<i64> {
        let mut from = start.to_vec();
        let mut revision = 0;
        loop {
            let mut options = etcd_client::GetOptions::new()
                .with_range(end.to_vec())
                .with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self
                .call("reading the prefix", Effect::Nothing, || {
                    let mut kv = self.kv.clone();
                    let (from, options) = (from.clone(), options.clone());
                    async move { kv.get(from, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                each(kv);
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(revision),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, map_error, Effect, Kind};
    use crate::error::Error;
    use tonic::{Code, Status};

    fn kind(code: Code, message: &str) -> Kind {
        classify(&etcd_client::Error::GRpcStatus(Status::new(code, message))).0
    }

    #[test]
    fn a_rate_limit_is_transient_not_too_large() {
        // etcd's ErrGRPCTooManyRequests.
        let rate = Status::new(Code::ResourceExhausted, "etcdserver: too many requests");
        let err = etcd_client::Error::GRpcStatus(rate);
        assert_eq!(classify(&err).0, Kind::Transient);
        let mapped = map_error(&err, "the commit", Effect::Unknown);
        assert!(matches!(mapped, Error::Unavailable { .. }), "{mapped:?}");
        assert!(mapped.to_string().contains("too many requests"), "{mapped}");
        // tonic's load shedding of a full connection.
        assert_eq!(
            kind(
                Code::ResourceExhausted,
                "Too many active requests for the connection"
            ),
            Kind::Transient
        );
        // Any other exhausted resource without a size in its message.
        assert_eq!(kind(Code::ResourceExhausted, "quota"), Kind::Transient);
    }

    #[test]
    fn size_limits_space_and_the_rest_keep_their_kinds() {
        for (code, message) in [
            (Code::InvalidArgument, "etcdserver: request is too large"),
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                Code::ResourceExhausted,
                "grpc: received message larger than max (2097152 vs. 1572864)",
            ),
            (
                Code::ResourceExhausted,
                "grpc: trying to send message larger than max (5 vs. 4)",
            ),
            (
                Code::OutOfRange,
                "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
            ),
        ] {
            assert_eq!(kind(code, message), Kind::TooLarge, "{message}");
        }
        assert_eq!(
            kind(
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded"
            ),
            Kind::NoSpace
        );
        assert_eq!(
            kind(
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            ),
            Kind::Compacted
        );
        assert_eq!(
            kind(Code::InvalidArgument, "etcdserver: permission denied"),
            Kind::Denied
        );
        assert_eq!(
            kind(Code::Unavailable, "etcdserver: leader changed"),
            Kind::Transient
        );
        assert_eq!(
            kind(Code::Unavailable, "etcdserver: no leader"),
            Kind::Transient
        );
        assert_eq!(
            kind(Code::NotFound, "etcdserver: requested lease not found"),
            Kind::Other
        );
    }
}
