//! Where a VBD's NBD export listens ([`NbdListen`]); the server is tapdisk's (`tapdisk::nbd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits;

/// Where an NBD server listens: `unix:/path/to/socket` or `tcp:ADDR:PORT`. In the control
/// protocol it travels in that form (an address, as every NBD tool writes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NbdListen {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP socket (port 0 picks a free port; tapdisk reports the one it got).
    Tcp(SocketAddr),
}

impl NbdListen {
    /// Checks what parsing checks, for a value built otherwise.
    pub fn validate(&self) -> Result<()> {
        match self {
            NbdListen::Unix(p) => limits::NBD_UNIX_PATH
                .check(p.as_os_str().len() as u64)
                .map_err(|e| {
                    Error::invalid("nbd", format!("NBD socket path {}: {e}", p.display()))
                }),
            NbdListen::Tcp(_) => Ok(()),
        }
    }
}

impl FromStr for NbdListen {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid("nbd", why);
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad(format!("NBD address '{s}' has an empty socket path")));
            }
            let max = limits::NBD_UNIX_PATH.max;
            if path.len() as u64 > max {
                return Err(bad(format!(
                    "NBD socket path in '{s}' is {} bytes; unix sockets allow at most {max}",
                    path.len(),
                )));
            }
            Ok(NbdListen::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse().map(NbdListen::Tcp).map_err(|_| {
                bad(format!(
                    "NBD address '{s}': '{addr}' is not an IP address and port \
                     (write tcp:127.0.0.1:10809 or tcp:[::1]:10809)"
                ))
            })
        } else {
            Err(bad(format!(
                "NBD address '{s}' must be unix:/path/to/socket or tcp:ADDR:PORT \
                 (e.g. tcp:127.0.0.1:10809)"
            )))
        }
    }
}

impl std::fmt::Display for NbdListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdListen::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdListen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl TryFrom<String> for NbdListen {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<NbdListen> for String {
    fn from(l: NbdListen) -> String {
        l.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parse_and_format() {
        let u: NbdListen = "unix:/run/tap/nbd0.sock".parse().unwrap();
        assert_eq!(u, NbdListen::Unix("/run/tap/nbd0.sock".into()));
        assert_eq!(u.to_string(), "unix:/run/tap/nbd0.sock");
        let t: NbdListen = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(t, NbdListen::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(t.to_string(), "tcp:127.0.0.1:10809");
        let v6: NbdListen = "tcp:[::1]:0".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:0");
        assert_eq!(v6.to_string().parse::<NbdListen>().unwrap(), v6);
        let e = |s: &str| s.parse::<NbdListen>().unwrap_err().to_string();
        assert!(e("/run/x.sock").contains("must be unix:"));
        assert!(e("nbd:foo").contains("must be unix:"));
        assert!(e("unix:").contains("empty socket path"));
        assert!(e(&format!("unix:/{}", "x".repeat(120))).contains("at most 107"));
        assert!(e("tcp:127.0.0.1").contains("not an IP address and port"));
        assert!(e("tcp:localhost:10809").contains("not an IP address and port"));
        assert!(e("tcp:127.0.0.1:99999").contains("not an IP address and port"));
        assert!(e("tcp:::1:10809").contains("not an IP address and port"));
    }

    #[test]
    fn travels_as_its_address() {
        let t: NbdListen = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#""tcp:127.0.0.1:10809""#
        );
        assert!(serde_json::from_str::<NbdListen>(r#""udp:1.2.3.4:5""#).is_err());
        let long = NbdListen::Unix(PathBuf::from("/".repeat(200)));
        assert_eq!(long.validate().unwrap_err().field(), Some("nbd"));
    }
}
