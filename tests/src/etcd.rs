//! A private etcd cluster for tests: `n` members of Debian's `etcd` on loopback (peer and
//! client URLs on 127.0.0.1, ports picked free), data in a temporary folder on /dev/shm,
//! short heartbeats so that a killed leader is replaced in about a second. Members can be
//! killed (SIGKILL) and started again; everything is killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The etcd binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// Whether etcd is installed.
pub fn available() -> bool {
    Path::new(ETCD).exists()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// More addresses every member also serves clients on (host links of a storage LAN).
    extra_ips: Vec<String>,
}

impl Cluster {
    /// Starts `n` members serving clients on loopback and on each of `extra_ips` too; waits
    /// until the cluster has a leader.
    pub fn start(n: usize, extra_ips: &[String]) -> Result<Cluster> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("tapdisk-etcd-")
            .tempdir_in(base)?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let mut c = Cluster {
            dir,
            members,
            extra_ips: extra_ips.to_vec(),
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_leader(Duration::from_secs(20))?;
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again, on its data folder).
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let ic = self.initial_cluster();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let mut clients = vec![format!("http://127.0.0.1:{}", m.client_port)];
        for ip in &self.extra_ips {
            clients.push(format!("http://{ip}:{}", m.client_port));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))?;
        let child = Command::new(ETCD)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--listen-client-urls")
            .arg(clients.join(","))
            .arg("--advertise-client-urls")
            .arg(&clients[0])
            .arg("--initial-cluster")
            .arg(ic)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("tapdisk-{}", std::process::id()))
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Client URLs on loopback, comma-separated.
    pub fn endpoints(&self) -> String {
        self.endpoints_on("127.0.0.1")
    }

    /// Client URLs on `ip` (loopback or one of the extra addresses), comma-separated.
    pub fn endpoints_on(&self, ip: &str) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{ip}:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The member that is leader now (asked of each live member).
    pub fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let ep = vec![format!("http://127.0.0.1:{}", m.client_port)];
            let Ok(e) = stripe_etcd::Etcd::connect(&ep, "/", Duration::from_millis(500)) else {
                continue;
            };
            let mut c = e.client();
            let Ok(st) = e.block_on(async {
                tokio::time::timeout(Duration::from_millis(500), c.status()).await
            }) else {
                continue;
            };
            let Ok(st) = st else { continue };
            let me = st.header().map(|h| h.member_id()).unwrap_or(0);
            if st.leader() != 0 && st.leader() == me {
                return Some(i);
            }
        }
        None
    }

    /// Waits for a leader.
    pub fn wait_leader(&self, limit: Duration) -> Result<usize> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if t0.elapsed() > limit {
                bail!(
                    "etcd cluster has no leader after {limit:?} (logs in {})",
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the leader and returns which member it was.
    pub fn kill_leader(&mut self) -> Result<usize> {
        let l = self.wait_leader(Duration::from_secs(10))?;
        self.kill(l);
        Ok(l)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
