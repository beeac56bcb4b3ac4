//! A 3-node JetStream cluster on loopback for tests: real `nats-server` processes with routes to each other.
//!
//! Each node gets its own free client, route and monitor ports and its own store directory under one
//! temporary directory, and a config file written from the settings of `infra/nats/cluster/n*.conf` (the
//! cluster `infra/stack.sh cluster-up` starts), with the ports and store directory of this run. A test can
//! SIGKILL one node ([`NatsCluster::kill`]) and start it again on the same ports and store
//! ([`NatsCluster::restart`]); every wait is a deadline poll of the monitor endpoints.
//!
//! ```no_run
//! # async fn demo() {
//! let mut cluster = tests::NatsCluster::start().await;
//! let client = cluster.client().await; // connected to any node, fails over to the others
//! cluster.kill(0).await;
//! cluster.restart(0).await;
//! # drop(client);
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::{STOP_TIMEOUT, TempDir, nats_server_binary};

/// Nodes in the cluster: the smallest that keeps a quorum (2) with one node down.
const NODES: usize = 3;
/// How long the cluster may take to form and elect a JetStream meta leader (a few seconds on this box).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Start attempts when one of the nine ports chosen turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// Limit on one monitor request, so a stopped or stuck node cannot stall a poll.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// One node: its ports, files and process.
#[derive(Debug)]
struct Node {
    /// `n1`, `n2`, `n3`: the server name, which JetStream reports as a leader or replica.
    name: String,
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    /// Holds the config, the store (`store/`), the log and the ports file.
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn conf_path(&self) -> PathBuf {
        self.dir.join("node.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// The config of `infra/nats/cluster/n*.conf` with this run's ports and store directory. The store
    /// directory is set here, not with `-sd`: nats-server rejects both at once.
    fn config(&self, route_ports: &[u16]) -> String {
        let routes: String = route_ports
            .iter()
            .map(|port| format!("        nats-route://127.0.0.1:{port}\n"))
            .collect();
        format!(
            "# Written by tests::NatsCluster from infra/nats/cluster/n*.conf.\n\
             server_name: {name}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{monitor}\n\
             max_payload: 8MB\n\
             max_pending: 64MB\n\
             write_deadline: \"10s\"\n\
             cluster {{\n\
             \x20   name: cocoon\n\
             \x20   listen: 127.0.0.1:{route}\n\
             \x20   routes: [\n{routes}    ]\n\
             }}\n\
             jetstream {{\n\
             \x20   store_dir: \"{store}\"\n\
             \x20   max_memory_store: 256MB\n\
             \x20   max_file_store: 2GB\n\
             }}\n",
            name = self.name,
            client = self.client_port,
            monitor = self.monitor_port,
            route = self.route_port,
            store = self.dir.join("store").display(),
        )
    }

    /// Spawns the server (the config must be written); its output goes to the log, appended across restarts.
    fn spawn(&mut self) {
        let binary = nats_server_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
        let child = Command::new(&binary)
            .arg("-c")
            .arg(self.conf_path())
            // `<exe>_<pid>.ports` appears here once the server listens: proof that *this* process holds the
            // ports, not another one that took them in the meantime.
            .arg("--ports_file_dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", binary.display()));
        self.child = Some(child);
    }

    /// Whether the process has written its ports file (it listens on every port).
    fn listening(&self) -> bool {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return false;
        };
        let suffix = format!("_{pid}.ports");
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))
            })
            .unwrap_or(false)
    }

    /// `Some(description)` when the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Three `nats-server` processes forming the JetStream cluster `cocoon`, on free loopback ports, each with
/// its own store under a temporary directory. Every node is killed and the directory removed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    /// Removed after `Drop for NatsCluster` has reaped every process.
    dir: TempDir,
}

impl NatsCluster {
    /// Starts three nodes and waits until they have elected a JetStream meta leader that sees the other two
    /// as current, so that R3 streams can be created at once.
    ///
    /// # Panics
    ///
    /// When the cluster does not form within 30 s; the message carries the nodes' logs.
    pub async fn start() -> NatsCluster {
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            dir: TempDir::new("cocoon-test-cluster"),
        };
        // A port found free can be taken before a node binds it (another test doing the same); then the
        // whole cluster starts again on fresh ports, since every node's config names every route port.
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.kill_all();
            let ports = free_ports(NODES * 3);
            cluster.nodes = (0..NODES)
                .map(|i| {
                    let dir = cluster.dir.path().join(format!("n{}-{attempt}", i + 1));
                    std::fs::create_dir_all(&dir)
                        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
                    Node {
                        name: format!("n{}", i + 1),
                        client_port: ports[3 * i],
                        route_port: ports[3 * i + 1],
                        monitor_port: ports[3 * i + 2],
                        dir,
                        child: None,
                    }
                })
                .collect();
            let route_ports: Vec<u16> = cluster.nodes.iter().map(|n| n.route_port).collect();
            for node in &mut cluster.nodes {
                std::fs::write(node.conf_path(), node.config(&route_ports))
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", node.conf_path().display()));
                node.spawn();
            }
            match cluster.wait_formed(None).await {
                Ok(()) => return cluster,
                Err(failure) if failure.port_taken && attempt < PORT_ATTEMPTS => continue,
                Err(failure) => panic!("{}", failure.message),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Number of nodes (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never empty; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URLs of every node, comma-separated (`nats://127.0.0.1:A,nats://127.0.0.1:B,...`): what
    /// `bus::BusConfig` and the services take for a cluster. A killed node stays listed; clients skip it.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        self.nodes[i].client_url()
    }

    /// The server name of node `i` (`n1`, `n2`, `n3`), as JetStream names leaders and replicas.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node with this server name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// Whether node `i` runs (not killed or stopped).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// The monitor URL of node `i`, e.g. for `/jsz?streams=true`.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].monitor_port)
    }

    /// A GET on node `i`'s monitor endpoint (`path` like `/jsz?streams=true`), parsed as JSON; `None` when
    /// the node does not answer 200 with JSON.
    pub async fn monitor_json(&self, i: usize, path: &str) -> Option<Value> {
        let (status, body) = http_get(self.nodes[i].monitor_port, path).await?;
        (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    /// A client connected to any running node (default options, so it reconnects to another node when its
    /// own goes away).
    ///
    /// # Panics
    ///
    /// When no node accepts the connection.
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.nodes.iter().map(Node::client_url).collect();
        async_nats::connect(urls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the cluster at {}: {e}", self.url()))
    }

    /// The JetStream meta leader as the running nodes agree on it, or `None` while they do not.
    pub async fn meta_leader(&self) -> Option<String> {
        let mut agreed: Option<String> = None;
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let jsz = self.monitor_json(i, "/jsz").await?;
            let leader = jsz["meta_cluster"]["leader"].as_str()?.to_owned();
            if leader.is_empty() || agreed.as_ref().is_some_and(|a| *a != leader) {
                return None;
            }
            agreed = Some(leader);
        }
        agreed
    }

    /// Kills node `i` abruptly (SIGKILL) and waits until it has exited: a crash. No-op when not running.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops node `i` if it runs (SIGKILL: a clean stop is not what a cluster test is about) and starts it
    /// again on the same ports and store, then waits until it is healthy (JetStream current with the meta
    /// leader, and its stream and consumer replicas caught up) and the meta leader sees it as current.
    ///
    /// # Panics
    ///
    /// When it does not rejoin within 30 s; the message carries the logs.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.nodes[i].spawn();
        if let Err(failure) = self.wait_formed(Some(i)).await {
            panic!("restart of {}: {}", self.nodes[i].name, failure.message);
        }
    }

    /// Polls until the cluster is formed: every running node listens and answers `/healthz` with 200, all
    /// agree on a meta leader, and the leader sees every other running node as a current replica. With
    /// `rejoining`, only that node's exit counts as a start failure.
    async fn wait_formed(&mut self, rejoining: Option<usize>) -> Result<(), StartFailure> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            for i in 0..self.nodes.len() {
                if rejoining.is_some_and(|r| r != i) {
                    continue;
                }
                if let Some(status) = self.nodes[i].exited() {
                    self.nodes[i].child = None;
                    let log = self.nodes[i].log_tail();
                    return Err(StartFailure {
                        port_taken: log.contains("address already in use"),
                        message: format!(
                            "nats-server {} exited during start-up with {status}:\n{log}",
                            self.nodes[i].name
                        ),
                    });
                }
            }
            if self.formed().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure {
                    port_taken: false,
                    message: format!(
                        "the cluster did not form (a meta leader seeing every running node current, every \
                         node healthy) within {FORM_TIMEOUT:?}; meta leader: {:?}\n{}",
                        self.meta_leader().await,
                        self.logs()
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn formed(&self) -> bool {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect();
        for &i in &running {
            if !self.nodes[i].listening() {
                return false;
            }
            // Clustered, /healthz is 200 only once JetStream is current with the meta leader and every
            // stream and consumer replica on the node has caught up.
            if !matches!(
                http_get(self.nodes[i].monitor_port, "/healthz").await,
                Some((200, _))
            ) {
                return false;
            }
        }
        let Some(leader) = self.meta_leader().await else {
            return false;
        };
        let Some(leader_index) = self.index_of(&leader) else {
            return false;
        };
        let Some(jsz) = self.monitor_json(leader_index, "/jsz").await else {
            return false;
        };
        let current: Vec<&str> = jsz["meta_cluster"]["replicas"]
            .as_array()
            .map(|replicas| {
                replicas
                    .iter()
                    .filter(|r| r["current"].as_bool() == Some(true))
                    .filter_map(|r| r["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        running
            .iter()
            .filter(|&&i| i != leader_index)
            .all(|&i| current.contains(&self.nodes[i].name.as_str()))
    }

    /// SIGKILLs every node and waits (bounded) until each has exited. Blocking, so that `Drop` can use it:
    /// kill_on_drop alone would not wait, and the directory is removed right after the drop, so no process
    /// may still write into it.
    fn kill_all(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for child in &mut children {
            let _ = child.start_kill();
        }
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        for child in &mut children {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// The last lines of every node's log, for panic messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- {} ({}) ---\n{}",
                    node.name,
                    node.dir.display(),
                    node.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The temporary directory that holds the nodes' configs, stores and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Why a start attempt failed, and whether fresh ports may help.
#[derive(Debug)]
struct StartFailure {
    port_taken: bool,
    message: String,
}

/// `count` distinct loopback ports that were free a moment ago: all are held at once, so the OS cannot hand
/// out one twice.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|addr| addr.port())
                .unwrap_or_else(|e| panic!("cannot read a bound port: {e}"))
        })
        .collect()
}

/// A minimal HTTP/1.0 GET on a loopback port (the monitor endpoint needs nothing more, and the harness stays
/// free of an HTTP client dependency): the status code and the body, or `None` when nothing answers in time.
async fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .ok()?;
        // HTTP/1.0: the server closes the connection after the body, without chunking.
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let head_end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
        let status_line = std::str::from_utf8(&response[..head_end])
            .ok()?
            .lines()
            .next()?;
        let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response[head_end + 4..].to_vec()))
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}
