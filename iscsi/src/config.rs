//! Session settings and `iscsi://` URLs.

use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::text::Offer;

/// CHAP credentials (one-way: the target authenticates us).
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// CHAP_N.
    pub user: String,
    /// The shared secret.
    pub secret: String,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// Everything a session needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of the target portal.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// Our initiator name.
    pub initiator_name: String,
    /// CHAP credentials; `None` logs in without authentication.
    pub chap: Option<Chap>,
    /// What we offer in operational negotiation.
    pub offer: Offer,
    /// Commands in flight at once (submission queue, command slots and completion queue size).
    pub queue_depth: u16,
    /// Bound on connect plus login.
    pub login_timeout: Duration,
    /// Send a NOP-Out ping after this long without hearing from the target.
    pub nop_interval: Duration,
    /// Declare the connection dead when a ping stays unanswered this long.
    pub nop_timeout: Duration,
    /// A command unanswered this long (up to 1.5 times this) drops the connection; the
    /// command is then retried after the reconnect like any other in flight.
    pub command_timeout: Duration,
    /// After a lost connection, keep trying to log in again for this long before failing the
    /// commands in flight with [`crate::IoError::Disconnected`].
    pub reconnect_timeout: Duration,
    /// Pause between reconnection attempts.
    pub reconnect_interval: Duration,
    /// Logger for connection events (never per command).
    pub logger: slog::Logger,
    /// Which thread drives the connection.
    pub drive: Drive,
    /// A persistent reservation key to register on every login (see [`Registration`]).
    pub registration: Option<Registration>,
}

/// A reservation key a session registers for its I_T nexus (PERSISTENT RESERVE OUT, REGISTER
/// AND IGNORE EXISTING KEY) on the listed LUNs right after every login, the first and each
/// reconnect, before any of the caller's commands go out; it then makes sure the LUN is
/// reserved "write exclusive, registrants only" by that key, preempting lower keys (older
/// writers: keys are fencing tokens, higher is newer) and failing the login with
/// [`crate::Error::Fenced`] when a higher key is registered. A target ties registrations to the
/// I_T nexus, and a reconnect is a new one (tgt gives it a new TSIH), so without this the
/// commands resent after a reconnect would meet RESERVATION CONFLICT under a "registrants
/// only" reservation. The key is read at each login: a holder that lost its right to write
/// stores 0 there, and its later logins register nothing (so a fenced writer never registers
/// itself back in).
#[derive(Debug, Clone)]
pub struct Registration {
    /// The key (0: register nothing).
    pub key: Arc<AtomicU64>,
    /// The LUNs to register on.
    pub luns: Vec<u16>,
}

/// Which thread drives a session's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Drive {
    /// Its own IO thread (the default): socket work runs beside the caller, on another core
    /// where there is one, at the price of a wake-up each way per batch of commands.
    #[default]
    Thread,
    /// The caller's thread, in [`crate::Session::drive`]: no hand-off between threads, so less
    /// CPU per command; logins after a lost connection run on a helper thread so the caller
    /// never blocks on them.
    Inline,
}

impl Config {
    /// Settings for `target` at `portal` with defaults for the rest.
    pub fn new(portal: impl Into<String>, target: impl Into<String>) -> Config {
        Config {
            portal: portal.into(),
            target: target.into(),
            initiator_name: default_initiator_name(),
            chap: None,
            offer: Offer::default(),
            queue_depth: 64,
            login_timeout: Duration::from_secs(10),
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(30),
            reconnect_interval: Duration::from_millis(100),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            drive: Drive::Thread,
            registration: None,
        }
    }
}

/// The initiator name used when none is configured: `iqn.2026-11.rs.tapdisk:<hostname>`.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "iqn.2026-11.rs.tapdisk:{}",
        if host.is_empty() { "initiator" } else { &host }
    )
}

/// `iscsi://[user[%secret]@]host[:port]/target-iqn/lun`, the form libiscsi and QEMU use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `host:port` (port 3260 when not given).
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN.
    pub lun: u16,
    /// Credentials from the URL.
    pub chap: Option<Chap>,
}

impl FromStr for Url {
    type Err = Error;

    fn from_str(s: &str) -> Result<Url, Error> {
        let bad = |why: &str| Error::Invalid(format!("iSCSI URL {s:?}: {why}"));
        let rest = s
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("must start with iscsi://"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let host = parts
            .next()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let target = parts
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("no target name"))?;
        let lun = match parts.next() {
            None | Some("") => 0,
            Some(l) => l
                .parse()
                .map_err(|_| bad("LUN is not a number below 65536"))?,
        };
        let portal = if host.starts_with('[') {
            if host.contains("]:") {
                host.to_owned()
            } else {
                format!("{host}:3260")
            }
        } else if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:3260")
        };
        let chap = auth.map(|a| {
            let (u, p) = a.split_once('%').unwrap_or((a, ""));
            Chap {
                user: u.to_owned(),
                secret: p.to_owned(),
            }
        });
        Ok(Url {
            portal,
            target: target.to_owned(),
            lun,
            chap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: Url = "iscsi://127.0.0.1:3261/iqn.2026-11.lab:srv1/1"
            .parse()
            .unwrap();
        assert_eq!(u.portal, "127.0.0.1:3261");
        assert_eq!(u.target, "iqn.2026-11.lab:srv1");
        assert_eq!(u.lun, 1);
        let u: Url = "iscsi://bob%s3cret@host/iqn.x:y".parse().unwrap();
        assert_eq!(u.portal, "host:3260");
        assert_eq!(u.lun, 0);
        assert_eq!(u.chap.unwrap().secret, "s3cret");
        assert!("http://x/y".parse::<Url>().is_err());
        assert!("iscsi://host".parse::<Url>().is_err());
        assert!("iscsi://host/t/x".parse::<Url>().is_err());
    }
}
