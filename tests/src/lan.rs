//! The emulated storage LAN (`tests/storage-lan/storage-lan.sh`) for tests: tgtd servers in
//! network namespaces, each test with its own namespaces, subnets, control ports and folder so
//! tests can run side by side; torn down on drop. Plus an in-process extent master.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("storage-lan/storage-lan.sh")
}

/// Whether this machine can run the LAN (root, tgtd, ip, tc).
pub fn available() -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    root && ["/usr/sbin/tgtd", "/usr/sbin/tgtadm"]
        .iter()
        .all(|p| Path::new(p).exists())
        && Command::new("tc").arg("-V").output().is_ok()
}

/// A running LAN.
pub struct Lan {
    env: Vec<(String, String)>,
    /// iSCSI URLs of the servers, in order.
    pub urls: Vec<String>,
}

impl Lan {
    /// Starts `n` servers behind links of `rate` (`none` = unshaped) with LUNs of `lun_size`;
    /// `slot` (0..20) picks this LAN's names, subnets and ports.
    pub fn up(slot: u32, n: u32, rate: &str, lun_size: &str) -> Result<Lan> {
        let env = vec![
            ("STORAGE_LAN_PREFIX".into(), format!("tdse{slot}")),
            (
                "STORAGE_LAN_NET".into(),
                (150 + 8 * (slot % 12)).to_string(),
            ),
            (
                "STORAGE_LAN_CTL_BASE".into(),
                (21000 + 10 * slot).to_string(),
            ),
            (
                "STORAGE_LAN_DIR".into(),
                format!("/dev/shm/tapdisk-e2e-lan-{slot}"),
            ),
        ];
        let mut lan = Lan { env, urls: vec![] };
        lan.run(&["up", &n.to_string(), rate, lun_size])?;
        let out = lan.run(&["urls"])?;
        lan.urls = out.lines().map(str::to_owned).collect();
        if lan.urls.len() != n as usize {
            bail!("storage LAN has {} servers, not {n}", lan.urls.len());
        }
        Ok(lan)
    }

    /// The script with this LAN's settings and `args`, to run later (or elsewhere).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(script())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs the script with this LAN's settings.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .output()
            .context("running storage-lan.sh")?;
        if !out.status.success() {
            bail!(
                "storage-lan.sh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn var(&self, k: &str) -> &str {
        self.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// Adds host `h` (1..=4): a network namespace reaching every server (see the script).
    pub fn host(&self, h: u32) -> Result<()> {
        self.run(&["host", &h.to_string()]).map(|_| ())
    }

    /// Host `h`'s namespace.
    pub fn host_ns(&self, h: u32) -> String {
        format!("{}h{h}", self.var("STORAGE_LAN_PREFIX"))
    }

    /// The address outside host `h`'s namespace that it reaches (where etcd listens for it).
    pub fn host_peer_ip(&self, h: u32) -> String {
        format!("169.254.{}.{}", self.var("STORAGE_LAN_NET"), 200 + h)
    }

    /// `program` to run inside host `h`'s namespace.
    pub fn in_host(&self, h: u32, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host_ns(h)]).arg(program);
        c
    }

    /// Sets host `h`'s link to the calling namespace (where etcd is) up or down; its links to
    /// the servers stay as they are (a host cut off from etcd but not from its storage).
    pub fn host_etcd_link(&self, h: u32, up: bool) -> Result<()> {
        let link = format!("{}a", self.host_ns(h));
        let st = Command::new("ip")
            .args(["link", "set", &link, if up { "up" } else { "down" }])
            .status()?;
        if !st.success() {
            bail!("ip link set {link} failed");
        }
        Ok(())
    }

    /// Server `i`'s LUN file (1-based).
    pub fn lun_file(&self, i: u32) -> PathBuf {
        Path::new(self.var("STORAGE_LAN_DIR")).join(format!("lun-{i}.img"))
    }

    /// Kills server `i` (1-based) with SIGKILL.
    pub fn kill(&self, i: u32) -> Result<()> {
        self.run(&["kill", &i.to_string()]).map(|_| ())
    }

    /// Starts server `i` again on its LUN file.
    pub fn start(&self, i: u32) -> Result<()> {
        self.run(&["start", &i.to_string()]).map(|_| ())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// Registers every server of `urls` with the master at `addr` (extents of `extent_size`).
pub fn register_all(addr: &str, extent_size: u64, urls: &[String]) -> Result<()> {
    let mut c = stripe::MasterClient::new(addr);
    for u in urls {
        let url: iscsi::Url = u.parse()?;
        let mut cfg = iscsi::Config::new(url.portal.clone(), url.target.clone());
        cfg.login_timeout = std::time::Duration::from_secs(5);
        let cap = iscsi::Client::connect(&cfg, url.lun)?.read_capacity16()?;
        c.register(&stripe::proto::RegisterArgs {
            portal: url.portal,
            target: url.target,
            lun: u32::from(url.lun),
            start: 0,
            count: (cap.bytes() / extent_size) as u32,
        })?;
    }
    Ok(())
}

/// An extent master in this process (a thread serving until the process ends), with every
/// server of `lan` registered; returns its address.
pub fn master(state: &Path, extent_size: u64, urls: &[String]) -> Result<String> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let (store, st) = stripe::master::Store::open(state, Some(extent_size))?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let m = stripe::master_server::Master::new(store, st, log);
    std::thread::spawn(move || m.serve(l));
    let mut c = stripe::MasterClient::new(&addr);
    for u in urls {
        let url: iscsi::Url = u.parse()?;
        let mut cfg = iscsi::Config::new(url.portal.clone(), url.target.clone());
        cfg.login_timeout = std::time::Duration::from_secs(5);
        let cap = iscsi::Client::connect(&cfg, url.lun)?.read_capacity16()?;
        c.register(&stripe::proto::RegisterArgs {
            portal: url.portal,
            target: url.target,
            lun: u32::from(url.lun),
            start: 0,
            count: (cap.bytes() / extent_size) as u32,
        })?;
    }
    Ok(addr)
}
