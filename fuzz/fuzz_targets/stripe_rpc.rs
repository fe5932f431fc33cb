//! A hostile network peer of the extent master, and a hostile master of its clients: the
//! bytes are cut into ONC RPC records (record marking, fragments, a size limit), each record
//! is executed by an in-memory master with a few servers registered, and the same bytes are
//! decoded as every kind of reply a client reads. Most inputs are built to be valid calls
//! (right program and version, procedures with arguments from the input) so they reach the
//! master's logic. Never a panic or an unbounded allocation; every call gets a reply that
//! decodes; no extent ever has two owners.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use stripe::master::State;
use stripe::master_server::Master;
use stripe::proto::{self, AllocArgs, RegisterArgs};
use stripe::rpc;
use stripe::xdr::{Dec, Enc};

#[derive(Arbitrary, Debug)]
enum Call {
    Null,
    Register {
        server: u8,
        lun: u8,
        start: u32,
        count: u16,
    },
    Allocate {
        disk: u8,
        first: u16,
        count: u16,
        replicas: u8,
    },
    Release {
        disk: u8,
    },
    List,
    /// Raw bytes after a valid call header for procedure `proc_`.
    Raw {
        proc_: u8,
        args: Vec<u8>,
    },
    /// A whole record of raw bytes.
    Garbage(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    calls: Vec<Call>,
    /// Raw wire bytes through the record reader and the reply decoders.
    wire: Vec<u8>,
}

fn call_bytes(xid: u32, c: &Call) -> Vec<u8> {
    let mut e = Enc::new();
    let (proc_, args): (u32, Vec<u8>) = match c {
        Call::Null => (proto::PROC_NULL, vec![]),
        Call::Register {
            server,
            lun,
            start,
            count,
        } => {
            let mut a = Enc::new();
            RegisterArgs {
                portal: format!("10.0.0.{}:3260", server % 6),
                target: format!("iqn.x:{}", server % 6),
                lun: u32::from(*lun % 3),
                start: u64::from(*start) << 12,
                count: u32::from(*count % 300),
            }
            .encode(&mut a);
            (proto::PROC_REGISTER, a.into_bytes())
        }
        Call::Allocate {
            disk,
            first,
            count,
            replicas,
        } => {
            let mut a = Enc::new();
            AllocArgs {
                disk: format!("d{}", disk % 8),
                first: u32::from(*first % 64),
                count: u32::from(*count % 40),
                replicas: u32::from(*replicas % 5),
            }
            .encode(&mut a);
            (proto::PROC_ALLOCATE, a.into_bytes())
        }
        Call::Release { disk } => {
            let mut a = Enc::new();
            a.string(&format!("d{}", disk % 8));
            (proto::PROC_RELEASE, a.into_bytes())
        }
        Call::List => (proto::PROC_LIST, vec![]),
        Call::Raw { proc_, args } => (u32::from(*proc_ % 7), args.clone()),
        Call::Garbage(b) => return b.clone(),
    };
    rpc::encode_call(&mut e, xid, proto::PROG, proto::VERS, proc_);
    let mut b = e.into_bytes();
    b.extend_from_slice(&args);
    b
}

fn check_reply(proc_: Option<u32>, reply: &[u8]) {
    let mut d = Dec::new(reply);
    let (_, st) = rpc::decode_reply(&mut d).expect("our own reply decodes");
    if st != rpc::ReplyStatus::Success {
        return;
    }
    match proc_ {
        Some(proto::PROC_REGISTER) | Some(proto::PROC_RELEASE) => {
            let _ = proto::decode_register_res(&mut d).expect("result decodes");
        }
        Some(proto::PROC_ALLOCATE) => {
            let _ = proto::decode_alloc_res(&mut d).expect("result decodes");
        }
        Some(proto::PROC_LIST) => {
            proto::decode_list_res(&mut d).expect("result decodes");
        }
        _ => {}
    }
}

fuzz_target!(|input: Input| {
    let m = Master::in_memory(State::new(1 << 20));
    for (i, c) in input.calls.iter().take(64).enumerate() {
        let rec = call_bytes(i as u32, c);
        let proc_ = match c {
            Call::Register { .. } => Some(proto::PROC_REGISTER),
            Call::Allocate { .. } => Some(proto::PROC_ALLOCATE),
            Call::Release { .. } => Some(proto::PROC_RELEASE),
            Call::List => Some(proto::PROC_LIST),
            _ => None,
        };
        if let Some(reply) = m.handle(&rec) {
            check_reply(proc_, &reply);
        }
    }
    // The master's invariant: one owner per extent, one extent per owner.
    if let Some(reply) = m.handle(&call_bytes(9999, &Call::List)) {
        let mut d = Dec::new(&reply);
        rpc::decode_reply(&mut d).unwrap();
        let l = proto::decode_list_res(&mut d).unwrap();
        let mut owners = std::collections::HashSet::new();
        for x in &l.extents {
            if let Some(o) = &x.owner {
                assert!(owners.insert(o.clone()), "{o:?} owns two extents");
            }
        }
    }
    // Untrusted wire bytes: records, then every reply decoder.
    let mut r = &input.wire[..];
    while let Ok(Some(rec)) = rpc::read_record(&mut r, 1 << 16) {
        let _ = m.handle(&rec);
    }
    let mut d = Dec::new(&input.wire);
    if rpc::decode_reply(&mut d).is_ok() {
        let rest = d.rest();
        let _ = proto::decode_alloc_res(&mut Dec::new(rest));
        let _ = proto::decode_list_res(&mut Dec::new(rest));
        let _ = proto::decode_register_res(&mut Dec::new(rest));
    }
});
