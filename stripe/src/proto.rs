//! The master's RPC program in Rust types, mirroring `stripe/master.x` field by field, with
//! their XDR encodings. Decoders take untrusted bytes (fuzzed by `fuzz/fuzz_targets/stripe_rpc.rs`).

use crate::xdr::{Dec, Enc, XdrError};

/// Program number (`MASTER_PROG`, in the range RFC 5531 leaves to users).
pub const PROG: u32 = 0x2000_5444;
/// Program version (`MASTER_V1`).
pub const VERS: u32 = 1;
/// The port the master listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 20049;
/// `MASTER_NULL`.
pub const PROC_NULL: u32 = 0;
/// `MASTER_REGISTER`.
pub const PROC_REGISTER: u32 = 1;
/// `MASTER_ALLOCATE`.
pub const PROC_ALLOCATE: u32 = 2;
/// `MASTER_RELEASE`.
pub const PROC_RELEASE: u32 = 3;
/// `MASTER_LIST`.
pub const PROC_LIST: u32 = 4;
/// `MASTER_MAX_NAME`.
pub const MAX_NAME: u32 = 255;
/// `MASTER_MAX_MESSAGE`.
pub const MAX_MESSAGE: u32 = 1024;
/// `MASTER_MAX_EXTENTS`.
pub const MAX_EXTENTS: u32 = 65536;

/// `master_status`: why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `MASTER_OK`.
    Ok = 0,
    /// Not enough free extents on distinct servers.
    NoSpace = 1,
    /// Arguments out of range.
    BadArgs = 2,
    /// Overlaps or contradicts what is registered.
    Conflict = 3,
    /// The master could not store its state; nothing changed.
    Storage = 4,
    /// No such disk.
    NotFound = 5,
}

impl Status {
    fn decode(d: &mut Dec<'_>) -> Result<Status, XdrError> {
        Ok(match d.u32()? {
            0 => Status::Ok,
            1 => Status::NoSpace,
            2 => Status::BadArgs,
            3 => Status::Conflict,
            4 => Status::Storage,
            5 => Status::NotFound,
            v => {
                return Err(XdrError::BadValue {
                    what: "master_status",
                    value: v,
                })
            }
        })
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NoSpace => "no space",
            Status::BadArgs => "bad arguments",
            Status::Conflict => "conflict",
            Status::Storage => "storage error",
            Status::NotFound => "not found",
        }
    }
}

/// A failed call: the status and the master's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why.
    pub status: Status,
    /// The master's words.
    pub message: String,
}

impl Failure {
    /// A failure with a message (cut to [`MAX_MESSAGE`] bytes on the wire).
    pub fn new(status: Status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status.name())
    }
}

/// `master_extent`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// The master's number for it.
    pub id: u64,
    /// `host:port` of the server's iSCSI portal.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN.
    pub lun: u32,
    /// First byte on the LUN.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

impl Extent {
    fn encode(&self, e: &mut Enc) {
        e.u64(self.id)
            .string(&self.portal)
            .string(&self.target)
            .u32(self.lun)
            .u64(self.addr)
            .u64(self.len);
    }

    fn decode(d: &mut Dec<'_>) -> Result<Extent, XdrError> {
        Ok(Extent {
            id: d.u64()?,
            portal: d.string(MAX_NAME, "portal")?,
            target: d.string(MAX_NAME, "target")?,
            lun: d.u32()?,
            addr: d.u64()?,
            len: d.u64()?,
        })
    }
}

/// `master_register_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterArgs {
    /// `host:port` of the portal.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN.
    pub lun: u32,
    /// First byte offered.
    pub start: u64,
    /// Extents offered (of the master's extent size).
    pub count: u32,
}

impl RegisterArgs {
    /// XDR.
    pub fn encode(&self, e: &mut Enc) {
        e.string(&self.portal)
            .string(&self.target)
            .u32(self.lun)
            .u64(self.start)
            .u32(self.count);
    }

    /// From XDR.
    pub fn decode(d: &mut Dec<'_>) -> Result<RegisterArgs, XdrError> {
        Ok(RegisterArgs {
            portal: d.string(MAX_NAME, "portal")?,
            target: d.string(MAX_NAME, "target")?,
            lun: d.u32()?,
            start: d.u64()?,
            count: d.u32()?,
        })
    }
}

/// `master_alloc_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocArgs {
    /// Virtual disk id.
    pub disk: String,
    /// First extent index.
    pub first: u32,
    /// Extent indexes.
    pub count: u32,
    /// Copies of each on distinct servers.
    pub replicas: u32,
}

impl AllocArgs {
    /// XDR.
    pub fn encode(&self, e: &mut Enc) {
        e.string(&self.disk)
            .u32(self.first)
            .u32(self.count)
            .u32(self.replicas);
    }

    /// From XDR.
    pub fn decode(d: &mut Dec<'_>) -> Result<AllocArgs, XdrError> {
        Ok(AllocArgs {
            disk: d.string(MAX_NAME, "disk id")?,
            first: d.u32()?,
            count: d.u32()?,
            replicas: d.u32()?,
        })
    }
}

/// `master_placement`: where one replica of one extent index of a disk lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Extent index in the virtual disk.
    pub index: u32,
    /// Replica number (0 = primary).
    pub replica: u32,
    /// The extent.
    pub extent: Extent,
}

/// `master_extent_state`: a registered extent and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentState {
    /// The extent.
    pub extent: Extent,
    /// `(disk, index, replica)` when allocated.
    pub owner: Option<(String, u32, u32)>,
}

/// `master_list_res`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListRes {
    /// The master's extent size in bytes (0 before anything was registered).
    pub extent_size: u64,
    /// Every registered extent.
    pub extents: Vec<ExtentState>,
}

fn encode_failure(e: &mut Enc, f: &Failure) {
    let mut m = f.message.as_str();
    let mut cut = m.len().min(MAX_MESSAGE as usize);
    while !m.is_char_boundary(cut) {
        cut -= 1;
    }
    m = &m[..cut];
    e.u32(f.status as u32).string(m);
}

fn decode_failure(d: &mut Dec<'_>, st: Status) -> Result<Failure, XdrError> {
    Ok(Failure::new(st, d.string(MAX_MESSAGE, "message")?))
}

/// `master_register_res`.
pub fn encode_register_res(e: &mut Enc, r: &Result<u32, Failure>) {
    match r {
        Ok(n) => {
            e.u32(Status::Ok as u32).u32(*n);
        }
        Err(f) => encode_failure(e, f),
    }
}

/// `master_register_res` from XDR.
pub fn decode_register_res(d: &mut Dec<'_>) -> Result<Result<u32, Failure>, XdrError> {
    match Status::decode(d)? {
        Status::Ok => Ok(Ok(d.u32()?)),
        st => Ok(Err(decode_failure(d, st)?)),
    }
}

/// `master_alloc_res`.
pub fn encode_alloc_res(e: &mut Enc, r: &Result<Vec<Placement>, Failure>) {
    match r {
        Ok(ps) => {
            e.u32(Status::Ok as u32).u32(ps.len() as u32);
            for p in ps {
                e.u32(p.index).u32(p.replica);
                p.extent.encode(e);
            }
        }
        Err(f) => encode_failure(e, f),
    }
}

/// Smallest XDR size of an extent (empty strings).
const MIN_EXTENT: usize = 8 + 4 + 4 + 4 + 8 + 8;

/// `master_alloc_res` from XDR.
pub fn decode_alloc_res(d: &mut Dec<'_>) -> Result<Result<Vec<Placement>, Failure>, XdrError> {
    match Status::decode(d)? {
        Status::Ok => {
            let n = d.array_len(MAX_EXTENTS, 8 + MIN_EXTENT, "placements")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(Placement {
                    index: d.u32()?,
                    replica: d.u32()?,
                    extent: Extent::decode(d)?,
                });
            }
            Ok(Ok(v))
        }
        st => Ok(Err(decode_failure(d, st)?)),
    }
}

/// `master_release_args` / `master_release_res`.
pub fn encode_release_res(e: &mut Enc, r: &Result<u32, Failure>) {
    encode_register_res(e, r)
}

/// `master_release_res` from XDR.
pub fn decode_release_res(d: &mut Dec<'_>) -> Result<Result<u32, Failure>, XdrError> {
    decode_register_res(d)
}

/// `master_list_res`.
pub fn encode_list_res(e: &mut Enc, r: &ListRes) {
    e.u64(r.extent_size).u32(r.extents.len() as u32);
    for x in &r.extents {
        x.extent.encode(e);
        match &x.owner {
            Some((disk, i, rep)) => e.bool(true).string(disk).u32(*i).u32(*rep),
            None => e.bool(false).string("").u32(0).u32(0),
        };
    }
}

/// `master_list_res` from XDR.
pub fn decode_list_res(d: &mut Dec<'_>) -> Result<ListRes, XdrError> {
    let extent_size = d.u64()?;
    let n = d.array_len(MAX_EXTENTS, MIN_EXTENT + 16, "extents")?;
    let mut extents = Vec::with_capacity(n);
    for _ in 0..n {
        let extent = Extent::decode(d)?;
        let allocated = d.bool()?;
        let disk = d.string(MAX_NAME, "disk id")?;
        let index = d.u32()?;
        let replica = d.u32()?;
        extents.push(ExtentState {
            extent,
            owner: allocated.then_some((disk, index, replica)),
        });
    }
    Ok(ListRes {
        extent_size,
        extents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(id: u64) -> Extent {
        Extent {
            id,
            portal: "10.0.0.1:3260".into(),
            target: "iqn.x:y".into(),
            lun: 1,
            addr: id << 30,
            len: 1 << 30,
        }
    }

    #[test]
    fn results_round_trip() {
        let ok: Result<Vec<Placement>, Failure> = Ok(vec![Placement {
            index: 3,
            replica: 1,
            extent: ext(7),
        }]);
        let mut e = Enc::new();
        encode_alloc_res(&mut e, &ok);
        let b = e.into_bytes();
        let mut d = Dec::new(&b);
        assert_eq!(decode_alloc_res(&mut d).unwrap(), ok);
        d.finish().unwrap();

        let bad: Result<Vec<Placement>, Failure> = Err(Failure::new(Status::NoSpace, "full"));
        let mut e = Enc::new();
        encode_alloc_res(&mut e, &bad);
        assert_eq!(decode_alloc_res(&mut Dec::new(e.bytes())).unwrap(), bad);

        let l = ListRes {
            extent_size: 1 << 30,
            extents: vec![
                ExtentState {
                    extent: ext(1),
                    owner: None,
                },
                ExtentState {
                    extent: ext(2),
                    owner: Some(("vm1".into(), 0, 1)),
                },
            ],
        };
        let mut e = Enc::new();
        encode_list_res(&mut e, &l);
        assert_eq!(decode_list_res(&mut Dec::new(e.bytes())).unwrap(), l);

        let a = AllocArgs {
            disk: "vm1".into(),
            first: 0,
            count: 4,
            replicas: 2,
        };
        let mut e = Enc::new();
        a.encode(&mut e);
        assert_eq!(AllocArgs::decode(&mut Dec::new(e.bytes())).unwrap(), a);
    }

    #[test]
    fn hostile_counts_allocate_nothing() {
        // OK with 65536 placements claimed but no bytes behind them.
        let b = [0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode_alloc_res(&mut Dec::new(&b)).is_err());
        // Unknown status.
        assert!(decode_register_res(&mut Dec::new(&[0, 0, 0, 9, 0, 0, 0, 0])).is_err());
    }
}
