//! ONC RPC version 2 (RFC 5531) over TCP: record marking, call and reply headers.
//!
//! A record is one or more fragments, each behind a 4-byte big-endian header whose top bit
//! marks the last fragment and whose low 31 bits give its length (RFC 5531 section 11).
//! [`read_record`] reassembles one record up to a caller-given maximum, so a peer cannot make
//! us buffer more than that. Calls carry AUTH_NONE or AUTH_SYS credentials; the master accepts
//! both and uses neither (the thesis's master trusts its LAN; see the crate docs).

use std::io::{self, Read, Write};

use crate::xdr::{Dec, Enc, XdrError};

/// RPC protocol version.
pub const RPC_VERSION: u32 = 2;
/// `msg_type` CALL.
pub const CALL: u32 = 0;
/// `msg_type` REPLY.
pub const REPLY: u32 = 1;
/// AUTH_NONE.
pub const AUTH_NONE: u32 = 0;
/// AUTH_SYS.
pub const AUTH_SYS: u32 = 1;
/// Largest credential or verifier body (RFC 5531 section 8.2).
pub const MAX_AUTH: u32 = 400;

/// Largest fragment or record we build (we send one fragment per record).
const LAST_FRAGMENT: u32 = 0x8000_0000;

/// Reads one record of at most `max` bytes. `Ok(None)` at a clean end of stream (before the
/// first byte of a record).
pub fn read_record(r: &mut impl Read, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut rec = Vec::new();
    loop {
        let mut h = [0u8; 4];
        if rec.is_empty() {
            // A clean close between records is not an error.
            let mut got = 0;
            while got < 4 {
                match r.read(&mut h[got..]) {
                    Ok(0) if got == 0 => return Ok(None),
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        } else {
            r.read_exact(&mut h)?;
        }
        let h = u32::from_be_bytes(h);
        let len = (h & !LAST_FRAGMENT) as usize;
        if rec.len() + len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("RPC record longer than {max} bytes"),
            ));
        }
        let start = rec.len();
        rec.resize(start + len, 0);
        r.read_exact(&mut rec[start..])?;
        if h & LAST_FRAGMENT != 0 {
            return Ok(Some(rec));
        }
    }
}

/// Writes `body` as one record of one fragment.
pub fn write_record(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l < LAST_FRAGMENT)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "RPC record too long"))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(len | LAST_FRAGMENT).to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// The header of a call, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHeader {
    /// Transaction id, echoed in the reply.
    pub xid: u32,
    /// RPC version (must be 2 to be served).
    pub rpcvers: u32,
    /// Program number.
    pub prog: u32,
    /// Program version.
    pub vers: u32,
    /// Procedure number.
    pub proc_: u32,
    /// Credential flavor.
    pub cred_flavor: u32,
}

/// Decodes a call header from `d`, leaving the procedure's arguments unread.
pub fn decode_call(d: &mut Dec<'_>) -> Result<CallHeader, XdrError> {
    let xid = d.u32()?;
    let mtype = d.u32()?;
    if mtype != CALL {
        return Err(XdrError::BadValue {
            what: "msg_type of a call",
            value: mtype,
        });
    }
    let rpcvers = d.u32()?;
    let prog = d.u32()?;
    let vers = d.u32()?;
    let proc_ = d.u32()?;
    let cred_flavor = d.u32()?;
    d.opaque(MAX_AUTH, "credential")?;
    let _verf_flavor = d.u32()?;
    d.opaque(MAX_AUTH, "verifier")?;
    Ok(CallHeader {
        xid,
        rpcvers,
        prog,
        vers,
        proc_,
        cred_flavor,
    })
}

/// Encodes a call header with AUTH_NONE credentials.
pub fn encode_call(e: &mut Enc, xid: u32, prog: u32, vers: u32, proc_: u32) {
    e.u32(xid)
        .u32(CALL)
        .u32(RPC_VERSION)
        .u32(prog)
        .u32(vers)
        .u32(proc_)
        .u32(AUTH_NONE)
        .opaque(&[])
        .u32(AUTH_NONE)
        .opaque(&[]);
}

/// How a server answers a call (`accept_stat` and the rejections), RFC 5531 section 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// Executed; the results follow.
    Success,
    /// No such program here.
    ProgUnavail,
    /// Program versions served: low..=high.
    ProgMismatch(u32, u32),
    /// No such procedure.
    ProcUnavail,
    /// The arguments could not be decoded.
    GarbageArgs,
    /// The server failed (memory, storage).
    SystemErr,
    /// RPC versions served: low..=high (rejected).
    RpcMismatch(u32, u32),
    /// Authentication error (rejected), with its `auth_stat`.
    AuthError(u32),
}

impl std::fmt::Display for ReplyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyStatus::Success => write!(f, "success"),
            ReplyStatus::ProgUnavail => write!(f, "program unavailable"),
            ReplyStatus::ProgMismatch(l, h) => {
                write!(f, "program version mismatch (server has {l}..{h})")
            }
            ReplyStatus::ProcUnavail => write!(f, "procedure unavailable"),
            ReplyStatus::GarbageArgs => write!(f, "server could not decode the arguments"),
            ReplyStatus::SystemErr => write!(f, "server system error"),
            ReplyStatus::RpcMismatch(l, h) => {
                write!(f, "RPC version mismatch (server has {l}..{h})")
            }
            ReplyStatus::AuthError(s) => write!(f, "authentication error {s}"),
        }
    }
}

/// Encodes a reply header; for [`ReplyStatus::Success`] the results follow.
pub fn encode_reply(e: &mut Enc, xid: u32, st: ReplyStatus) {
    e.u32(xid).u32(REPLY);
    match st {
        ReplyStatus::RpcMismatch(l, h) => {
            e.u32(1).u32(0).u32(l).u32(h);
        }
        ReplyStatus::AuthError(s) => {
            e.u32(1).u32(1).u32(s);
        }
        _ => {
            // MSG_ACCEPTED with an AUTH_NONE verifier.
            e.u32(0).u32(AUTH_NONE).opaque(&[]);
            match st {
                ReplyStatus::Success => e.u32(0),
                ReplyStatus::ProgUnavail => e.u32(1),
                ReplyStatus::ProgMismatch(l, h) => e.u32(2).u32(l).u32(h),
                ReplyStatus::ProcUnavail => e.u32(3),
                ReplyStatus::GarbageArgs => e.u32(4),
                _ => e.u32(5),
            };
        }
    }
}

/// Decodes a reply header: its xid and status; on success the results follow in `d`.
pub fn decode_reply(d: &mut Dec<'_>) -> Result<(u32, ReplyStatus), XdrError> {
    let xid = d.u32()?;
    let mtype = d.u32()?;
    if mtype != REPLY {
        return Err(XdrError::BadValue {
            what: "msg_type of a reply",
            value: mtype,
        });
    }
    let st = match d.u32()? {
        0 => {
            let _flavor = d.u32()?;
            d.opaque(MAX_AUTH, "verifier")?;
            match d.u32()? {
                0 => ReplyStatus::Success,
                1 => ReplyStatus::ProgUnavail,
                2 => ReplyStatus::ProgMismatch(d.u32()?, d.u32()?),
                3 => ReplyStatus::ProcUnavail,
                4 => ReplyStatus::GarbageArgs,
                5 => ReplyStatus::SystemErr,
                v => {
                    return Err(XdrError::BadValue {
                        what: "accept_stat",
                        value: v,
                    })
                }
            }
        }
        1 => match d.u32()? {
            0 => ReplyStatus::RpcMismatch(d.u32()?, d.u32()?),
            1 => ReplyStatus::AuthError(d.u32()?),
            v => {
                return Err(XdrError::BadValue {
                    what: "reject_stat",
                    value: v,
                })
            }
        },
        v => {
            return Err(XdrError::BadValue {
                what: "reply_stat",
                value: v,
            })
        }
    };
    Ok((xid, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reassemble_fragments_within_the_limit() {
        // Two fragments: "abc" (not last) and "de" (last), then a clean end.
        let mut wire = Vec::new();
        wire.extend_from_slice(&3u32.to_be_bytes());
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&(2u32 | LAST_FRAGMENT).to_be_bytes());
        wire.extend_from_slice(b"de");
        let mut r = &wire[..];
        assert_eq!(read_record(&mut r, 16).unwrap().unwrap(), b"abcde");
        assert!(read_record(&mut r, 16).unwrap().is_none());
        // Over the limit: refused before the bytes are read.
        let mut r = &wire[..];
        assert!(read_record(&mut r, 4).is_err());
        // A header claiming 2 GiB is refused, not allocated.
        let huge = (0x7fff_ffffu32 | LAST_FRAGMENT).to_be_bytes();
        assert!(read_record(&mut &huge[..], 1 << 20).is_err());
        // Cut inside a record.
        assert!(read_record(&mut &wire[..5], 16).is_err());
        let mut out = Vec::new();
        write_record(&mut out, b"xyz").unwrap();
        assert_eq!(read_record(&mut &out[..], 8).unwrap().unwrap(), b"xyz");
    }

    #[test]
    fn call_and_reply_headers_round_trip() {
        let mut e = Enc::new();
        encode_call(&mut e, 9, 0x2000_0001, 1, 3);
        e.u32(42);
        let b = e.into_bytes();
        let mut d = Dec::new(&b);
        let h = decode_call(&mut d).unwrap();
        assert_eq!((h.xid, h.prog, h.vers, h.proc_), (9, 0x2000_0001, 1, 3));
        assert_eq!(d.u32().unwrap(), 42);
        for st in [
            ReplyStatus::Success,
            ReplyStatus::ProgUnavail,
            ReplyStatus::ProgMismatch(1, 1),
            ReplyStatus::ProcUnavail,
            ReplyStatus::GarbageArgs,
            ReplyStatus::SystemErr,
            ReplyStatus::RpcMismatch(2, 2),
            ReplyStatus::AuthError(1),
        ] {
            let mut e = Enc::new();
            encode_reply(&mut e, 5, st);
            let b = e.into_bytes();
            let mut d = Dec::new(&b);
            assert_eq!(decode_reply(&mut d).unwrap(), (5, st));
            d.finish().unwrap();
        }
    }
}
