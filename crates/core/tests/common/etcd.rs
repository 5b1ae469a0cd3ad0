//! Test harness: a real etcd cluster (the `etcd` and `etcdctl` binaries, 3.4 or later, on PATH;
//! .ci/run installs Debian's) on free loopback ports, with its data in a fresh temporary
//! directory. Readiness is an event: a thread reads each member's stderr line by line until etcd
//! logs that it serves client requests (and goes on reading, into `<dir>/m<i>.log`, so the pipe
//! never fills). Dropping the cluster kills every member and removes the directory.
//!
//! Include it with `#[path = "common/etcd.rs"] mod etcd_cluster;`. Keep a cluster owned by the
//! test (not in a `static`, which is never dropped: its members would outlive the test binary).
// Each test file uses its own part of this.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a member may take to serve clients before the start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const TAIL_LINES: usize = 40;

/// What etcd prints on stderr once a member serves clients: 3.4's default logger (capnslog) and
/// 3.5+ say "ready to serve client requests"; 3.4 with `--logger zap` says only "serving client
/// traffic ...".
fn is_ready_line(line: &str) -> bool {
    line.contains("ready to serve client requests") || line.contains("serving client traffic")
}

struct Member {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Why a member did not become ready.
enum NotReady {
    Exited(Option<std::process::ExitStatus>),
    Timeout,
    Spawn(std::io::Error),
}

impl Member {
    /// Spawns etcd and a thread that reads its stderr; returns the channel on which that thread
    /// says Ok(()) when the member is ready, or Err(()) when stderr ended first.
    fn spawn(&mut self, extra: &[&str]) -> Result<mpsc::Receiver<Result<(), ()>>, NotReady> {
        let mut child = Command::new("etcd")
            .args(&self.args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NotReady::Spawn)?;
        let stderr = child.stderr.take().expect("stderr is piped");
        self.child = Some(child);
        self.paused = false;
        self.tail.lock().unwrap().clear();
        let tail = Arc::clone(&self.tail);
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("member log");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                let mut tail = tail.lock().unwrap();
                tail.push_back(line);
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
                if !ready && is_ready_line(tail.back().unwrap()) {
                    ready = true;
                    let _ = tx.send(Ok(()));
                }
            }
            if !ready {
                let _ = tx.send(Err(()));
            }
        });
        Ok(rx)
    }

    fn wait_ready(
        &mut self,
        rx: mpsc::Receiver<Result<(), ()>>,
        deadline: Instant,
    ) -> Result<(), NotReady> {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stderr has ended: reap the process so that the tail and status are final.
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                Err(NotReady::Exited(status))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill();
                Err(NotReady::Timeout)
            }
        }
    }

    fn describe(&self, why: &NotReady) -> String {
        let why = match why {
            NotReady::Exited(Some(status)) => format!("exited before it was ready ({status})"),
            NotReady::Exited(None) => "exited before it was ready".to_string(),
            NotReady::Timeout => format!("was not ready after {READY_TIMEOUT:?}"),
            NotReady::Spawn(e) => format!("could not be started ({e}; is etcd installed?)"),
        };
        let tail: Vec<String> = self.tail.lock().unwrap().iter().cloned().collect();
        format!(
            "etcd member {} {why}; the last lines of its log:\n{}",
            self.name,
            tail.join("\n")
        )
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL (also ends a stopped process) and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn signal(&mut self, signal: &str) {
        let child = self.child.as_ref().expect("member is not running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", child.id());
    }
}

/// A running etcd cluster on 127.0.0.1; see the module doc.
pub struct EtcdCluster {
    members: Vec<Member>,
    endpoints: Vec<String>,
    /// PEM file of the throwaway CA that signed the members' certificate (TLS clusters only).
    ca: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` members and returns once each serves client requests (which needs a
    /// leader). Panics with the failing member's log tail if one exits first or takes longer
    /// than 30 s.
    pub fn start(members: usize) -> EtcdCluster {
        Self::start_with_args(members, &[])
    }

    /// As `start`, with clients served over TLS only (https; peers stay on http) with a
    /// certificate for 127.0.0.1 and localhost signed by a throwaway CA (`ca_pem`), made with the
    /// `openssl` command.
    pub fn start_tls(members: usize) -> EtcdCluster {
        Self::start_full(members, &[], true)
    }

    /// As `start`, with `etcd_args` given to every member after the harness's own flags (e.g.
    /// `["--max-txn-ops=16"]`). A start that fails because a port was taken meanwhile is tried
    /// again on new ports (3 tries).
    pub fn start_with_args(members: usize, etcd_args: &[&str]) -> EtcdCluster {
        Self::start_full(members, etcd_args, false)
    }

    fn start_full(members: usize, etcd_args: &[&str], tls: bool) -> EtcdCluster {
        assert!(members >= 1, "an etcd cluster needs at least one member");
        let mut attempt = 1;
        loop {
            match Self::try_start(members, etcd_args, tls) {
                Ok(cluster) => return cluster,
                Err(message) if attempt < 3 && message.contains("address already in use") => {
                    attempt += 1
                }
                Err(message) => panic!("{message}"),
            }
        }
    }

    fn try_start(count: usize, etcd_args: &[&str], tls: bool) -> Result<EtcdCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("kvstore-etcd-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let ports = free_ports(2 * count);
        let (client_ports, peer_ports) = ports.split_at(count);
        let initial_cluster: Vec<String> = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let certs = if tls {
            Some(make_certificates(dir.path())?)
        } else {
            None
        };
        let client_scheme = if tls { "https" } else { "http" };
        let token = format!("kvstore-test-{}-{}", std::process::id(), peer_ports[0]);
        let members = (0..count)
            .map(|i| {
                let name = format!("m{i}");
                let client = format!("{client_scheme}://127.0.0.1:{}", client_ports[i]);
                let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
                let mut args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", dir.path().join(&name).display()),
                    format!("--listen-client-urls={client}"),
                    format!("--advertise-client-urls={client}"),
                    format!("--listen-peer-urls={peer}"),
                    format!("--initial-advertise-peer-urls={peer}"),
                    format!("--initial-cluster={}", initial_cluster.join(",")),
                    format!("--initial-cluster-token={token}"),
                    "--heartbeat-interval=50".to_string(),
                    "--election-timeout=500".to_string(),
                ];
                if let Some(c) = &certs {
                    args.push(format!("--cert-file={}", c.cert.display()));
                    args.push(format!("--key-file={}", c.key.display()));
                }
                args.extend(etcd_args.iter().map(|a| a.to_string()));
                Member {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    args,
                    child: None,
                    paused: false,
                    tail: Arc::default(),
                }
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            endpoints: client_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            ca: certs.map(|c| c.ca),
            dir,
        };
        // Start all members before waiting: none is ready until a quorum runs.
        let mut waits = Vec::new();
        for m in cluster.members.iter_mut() {
            match m.spawn(&["--initial-cluster-state=new"]) {
                Ok(rx) => waits.push(rx),
                Err(why) => return Err(m.describe(&why)),
            }
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for (m, rx) in cluster.members.iter_mut().zip(waits) {
            if let Err(why) = m.wait_ready(rx, deadline) {
                return Err(m.describe(&why));
            }
        }
        Ok(cluster)
    }

    /// `127.0.0.1:PORT` of each member's client URL, by member index.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// `etcd://127.0.0.1:P0,127.0.0.1:P1/prefix` (`etcds://` for a TLS cluster).
    pub fn url(&self, prefix: &str) -> String {
        let scheme = if self.ca.is_some() { "etcds" } else { "etcd" };
        format!(
            "{scheme}://{}/{}",
            self.endpoints.join(","),
            prefix.trim_start_matches('/')
        )
    }

    /// The throwaway CA's certificate (PEM) of a TLS cluster.
    pub fn ca_pem(&self) -> Option<Vec<u8>> {
        self.ca
            .as_ref()
            .map(|p| std::fs::read(p).expect("read the CA certificate"))
    }

    /// Path of the CA's PEM file of a TLS cluster (for `etcdctl --cacert`).
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// Endpoints of the members that run and are not paused.
    pub fn live_endpoints(&mut self) -> Vec<String> {
        let mut live = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if m.running() && !m.paused {
                live.push(self.endpoints[i].clone());
            }
        }
        live
    }

    /// The directory that holds the members' data and logs (`m<i>.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL member `i`; returns once it has exited.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// SIGSTOP member `i`: the process stays but answers nothing.
    pub fn pause(&mut self, i: usize) {
        self.members[i].signal("STOP");
        self.members[i].paused = true;
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) {
        self.members[i].signal("CONT");
        self.members[i].paused = false;
    }

    /// Starts killed member `i` again with its data dir and flags; returns once it serves clients
    /// (which needs a quorum of the cluster).
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(!m.running(), "member {i} is still running: kill({i}) first");
        let result = m
            .spawn(&["--initial-cluster-state=existing"])
            .and_then(|rx| m.wait_ready(rx, Instant::now() + READY_TIMEOUT));
        if let Err(why) = result {
            panic!("{}", m.describe(&why));
        }
    }

    /// Kills member `i` of a one-member cluster, removes its data directory and starts a fresh
    /// member on the same ports with the same flags: a new, empty cluster where the old one was
    /// (revisions start again from 1). Returns once it serves clients.
    pub fn wipe_and_restart(&mut self, i: usize) {
        assert_eq!(
            self.members.len(),
            1,
            "only a one-member cluster can be wiped alone"
        );
        let data = self.dir.path().join(&self.members[i].name);
        let m = &mut self.members[i];
        m.kill();
        std::fs::remove_dir_all(&data).expect("remove the member's data directory");
        let result = m
            .spawn(&["--initial-cluster-state=new"])
            .and_then(|rx| m.wait_ready(rx, Instant::now() + READY_TIMEOUT));
        if let Err(why) = result {
            panic!("{}", m.describe(&why));
        }
    }

    /// Index of the leader that the live members agree on (asks `etcdctl endpoint status`; while
    /// an election is on, asks again every 100 ms for up to 10 s).
    pub fn leader(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = self.live_endpoints();
            let last = match etcdctl_status(&live, self.ca.as_deref()) {
                Ok(status) => {
                    let leaders: std::collections::BTreeSet<u64> =
                        status.iter().map(|s| s.leader).collect();
                    let found = match leaders.iter().collect::<Vec<_>>()[..] {
                        [id] => status.iter().find(|s| s.member_id == *id),
                        _ => None,
                    };
                    if let Some(s) = found {
                        return self
                            .endpoints
                            .iter()
                            .position(|e| *e == s.endpoint)
                            .expect("known endpoint");
                    }
                    format!("leaders reported: {leaders:?}")
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "no leader among the live members after 10 s ({last})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in self.members.iter_mut() {
            m.kill();
        }
        // The TempDir field then removes the directory.
    }
}

struct EndpointStatus {
    endpoint: String,
    member_id: u64,
    leader: u64,
}

fn etcdctl_status(endpoints: &[String], ca: Option<&Path>) -> Result<Vec<EndpointStatus>, String> {
    if endpoints.is_empty() {
        return Err("no live member".to_string());
    }
    let mut command = Command::new("etcdctl");
    if let Some(ca) = ca {
        command.arg(format!("--cacert={}", ca.display()));
    }
    let out = command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["--command-timeout=5s", "endpoint", "status", "-w", "json"])
        .output()
        .map_err(|e| format!("etcdctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "etcdctl: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("etcdctl output: {e}"))?;
    let list = json.as_array().ok_or("etcdctl output is not a list")?;
    list.iter()
        .map(|s| {
            let field =
                |v: &serde_json::Value| v.as_u64().ok_or_else(|| format!("etcdctl output: {s}"));
            Ok(EndpointStatus {
                endpoint: s["Endpoint"].as_str().unwrap_or_default().to_string(),
                member_id: field(&s["Status"]["header"]["member_id"])?,
                leader: field(&s["Status"]["leader"])?,
            })
        })
        .collect()
}

/// `count` distinct free TCP ports on 127.0.0.1 (all held open together, then released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

struct Certificates {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A throwaway CA and a server certificate for 127.0.0.1 and localhost signed by it (EC P-256),
/// with the extensions that rustls/webpki insist on (CA:TRUE + keyCertSign on the CA; SAN and
/// serverAuth on the server's).
fn make_certificates(dir: &Path) -> Result<Certificates, String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("write {name}: {e}"))
    };
    write(
        "ca.ext",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n",
    )?;
    write(
        "server.ext",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )?;
    let key = |name: &str| {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    };
    key("ca.key")?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=kvstore test CA",
        "-out",
        "ca.csr",
    ])?;
    openssl(&[
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "2", "-extfile", "ca.ext",
        "-out", "ca.pem",
    ])?;
    key("server.key")?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "server.key",
        "-subj",
        "/CN=127.0.0.1",
        "-out",
        "server.csr",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ])?;
    Ok(Certificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    })
}

// ---- what the etcd tests share ----

/// Options with a 5 s request timeout (the default suits services, not tests that stop members).
pub fn options() -> kvstore_core::etcd::ClusterOptions {
    options_with_timeout(Duration::from_secs(5))
}

pub fn options_with_timeout(timeout: Duration) -> kvstore_core::etcd::ClusterOptions {
    kvstore_core::etcd::ClusterOptions {
        request_timeout: timeout,
        ..Default::default()
    }
}

/// A record (envelope) with no metadata and `value` as its bytes.
pub fn rec(value: &str) -> Vec<u8> {
    kvstore_core::envelope::encode(&[], value.as_bytes())
}

/// The value of an envelope, as text.
pub fn value_of(record: Option<Arc<[u8]>>) -> Option<String> {
    record.map(|r| String::from_utf8(kvstore_core::envelope::decode(&r).unwrap().value).unwrap())
}

/// A plain etcd client on a runtime of its own, to look at or change the cluster's keys.
pub fn raw_client(cluster: &EtcdCluster) -> (tokio::runtime::Runtime, etcd_client::Client) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(etcd_client::Client::connect(cluster.endpoints(), None))
        .unwrap();
    (rt, client)
}

/// A second core on the same cluster and prefix: another process, as far as locks go.
pub fn open_other(cluster: &EtcdCluster, prefix: &str) -> kvstore_core::etcd::ClusterDatabase {
    kvstore_core::etcd::ClusterDatabase::open_unshared(&cluster.url(prefix), options()).unwrap()
}
