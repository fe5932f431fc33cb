//! A hostile iSCSI target: a connection in the full-feature phase with a few reads and writes
//! in flight (real buffers) receives a stream of target PDUs, mostly well-formed (valid
//! opcodes, tags of the commands in flight, correct digests) with arbitrary fields, lengths and
//! payloads, cut into arbitrary read sizes. Never a panic, never a write outside the commands'
//! buffers (the guard bytes around them stay intact), every command completes exactly once.
//! The pure parsers (whole PDUs, text, sense and parameter data) get the raw bytes too.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::io;
use std::time::Duration;

use iscsi::conn::{Command, Completion, Conn, Wire};
use iscsi::digest::Crc32c;
use iscsi::login::LoggedIn;
use iscsi::pdu::{self, op, Limits};
use iscsi::text::{self, Offer, Params};
use iscsi::{scsi, Dir};

const GUARD: usize = 64;

#[derive(Arbitrary, Debug)]
struct Cmd {
    write: bool,
    blocks: u8,
}

#[derive(Arbitrary, Debug)]
struct Pdu {
    opcode: u8,
    flags: u8,
    /// Which command's tag to use (index into the commands), or a raw tag.
    tag: Result<u8, u32>,
    ttt: u32,
    b2: u8,
    b3: u8,
    sn: [u32; 4],
    offset: u32,
    field44: u32,
    data: Vec<u8>,
    lie_len: Option<u32>,
    bad_header_digest: bool,
    bad_data_digest: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    header_digest: bool,
    data_digest: bool,
    max_recv: u16,
    max_xmit: u16,
    immediate: bool,
    initial_r2t: bool,
    cmds: Vec<Cmd>,
    pdus: Vec<Pdu>,
    chunks: Vec<u16>,
    raw: Vec<u8>,
}

struct Script {
    bytes: Vec<u8>,
    pos: usize,
    chunks: Vec<u16>,
    k: usize,
}

impl Wire for Script {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.pos >= self.bytes.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut budget = self
            .chunks
            .get(self.k)
            .map_or(usize::MAX, |&c| usize::from(c).max(1));
        self.k += 1;
        let mut n = 0;
        for v in iov {
            if budget == 0 || self.pos >= self.bytes.len() {
                break;
            }
            let take = v.iov_len.min(budget).min(self.bytes.len() - self.pos);
            // SAFETY: the caller guarantees `v` is valid for writes of `iov_len` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.bytes.as_ptr().add(self.pos),
                    v.iov_base as *mut u8,
                    take,
                );
            }
            self.pos += take;
            budget -= take;
            n += take;
        }
        Ok(n)
    }

    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        Ok(iov.iter().map(|v| v.iov_len).sum())
    }
}

fuzz_target!(|inp: Input| {
    // The pure parsers on raw bytes.
    let lim = Limits {
        max_recv_data_segment: 8192,
        header_digest: inp.header_digest,
        data_digest: inp.data_digest,
    };
    let _ = pdu::parse_pdu(&inp.raw, &lim);
    let _ = text::parse(&inp.raw);
    let _ = scsi::Sense::parse(&inp.raw).map(|s| s.to_string());
    let _ = scsi::Capacity::parse(&inp.raw);
    let _ = scsi::parse_report_luns(&inp.raw);
    let _ = scsi::Inquiry::parse(&inp.raw);
    if let Ok(s) = std::str::from_utf8(&inp.raw) {
        let _ = text::decode_binary(s);
    }

    // A connection with commands in flight.
    let offer = Offer::default();
    let mut params = Params::defaults(&offer);
    params.header_digest = inp.header_digest;
    params.data_digest = inp.data_digest;
    params.max_recv_data_segment = 512 + u32::from(inp.max_recv) % 16384;
    params.max_xmit_data_segment = 512 + u32::from(inp.max_xmit) % 16384;
    params.immediate_data = inp.immediate;
    params.initial_r2t = inp.initial_r2t;
    let mut conn = Conn::new(
        8,
        params.max_recv_data_segment,
        Duration::from_secs(5),
        Duration::from_secs(5),
    );
    conn.bind(&LoggedIn {
        params,
        tsih: 1,
        cmd_sn: 1,
        exp_stat_sn: 1,
        max_cmd_sn: 64,
    });
    let cmds: Vec<&Cmd> = inp.cmds.iter().take(8).collect();
    let mut bufs: Vec<Vec<u8>> = cmds
        .iter()
        .map(|c| vec![0xa5u8; usize::from(c.blocks.max(1)) * 512 + 2 * GUARD])
        .collect();
    let iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            // SAFETY: within the buffer (GUARD bytes from its start).
            iov_base: unsafe { b.as_mut_ptr().add(GUARD) }.cast(),
            iov_len: b.len() - 2 * GUARD,
        })
        .collect();
    for (i, c) in cmds.iter().enumerate() {
        let blocks = u32::from(c.blocks.max(1));
        let cmd = if c.write {
            Command::write(
                i as u32,
                1,
                scsi::write16(0, blocks, false),
                blocks * 512,
                &iovs[i],
                1,
            )
        } else {
            Command::read(
                i as u32,
                1,
                scsi::read16(0, blocks),
                blocks * 512,
                &iovs[i],
                1,
            )
        };
        assert!(cmd.check().is_ok());
        conn.enqueue(cmd);
    }
    let mut done: HashSet<u32> = HashSet::new();
    let mut out = |c: Completion| {
        assert!(done.insert(c.tag), "tag {} completed twice", c.tag);
    };
    let mut sink = Script {
        bytes: Vec::new(),
        pos: 0,
        chunks: Vec::new(),
        k: 0,
    };
    let _ = conn.flush(&mut sink, &mut out);
    let itts: Vec<u32> = (0..cmds.len() as u32)
        .map(|t| conn.itt_of(t).unwrap_or(pdu::RESERVED_TAG))
        .collect();

    // The hostile target's byte stream.
    let mut stream = Vec::new();
    for p in inp.pdus.iter().take(64) {
        let opcode = match p.opcode % 12 {
            0 => op::NOP_IN,
            1 | 2 => op::DATA_IN,
            3 => op::SCSI_RSP,
            4 => op::R2T,
            5 => op::ASYNC,
            6 => op::REJECT,
            7 => op::LOGOUT_RSP,
            8 => op::TEXT_RSP,
            9 => op::TASK_MGMT_RSP,
            10 => op::LOGIN_RSP,
            _ => p.opcode,
        };
        let data: &[u8] = &p.data[..p.data.len().min(20000)];
        let mut h = [0u8; pdu::BHS_LEN];
        h[0] = opcode;
        h[1] = p.flags;
        h[2] = p.b2;
        h[3] = p.b3;
        let dlen = p.lie_len.map_or(data.len() as u32, |l| l & 0xff_ffff);
        h[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);
        let itt = match p.tag {
            Ok(i) => itts
                .get(usize::from(i) % itts.len().max(1))
                .copied()
                .unwrap_or(0),
            Err(raw) => raw,
        };
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&p.ttt.to_be_bytes());
        for (k, v) in p.sn.iter().enumerate() {
            h[24 + 4 * k..28 + 4 * k].copy_from_slice(&v.to_be_bytes());
        }
        h[40..44].copy_from_slice(&p.offset.to_be_bytes());
        h[44..48].copy_from_slice(&p.field44.to_be_bytes());
        stream.extend_from_slice(&h);
        if inp.header_digest {
            let mut d = pdu::header_digest(&h);
            if p.bad_header_digest {
                d[0] ^= 1;
            }
            stream.extend_from_slice(&d);
        }
        if !data.is_empty() {
            let padded = pdu::pad4(data.len());
            let at = stream.len();
            stream.extend_from_slice(data);
            stream.resize(at + padded, 0);
            if inp.data_digest {
                let mut c = Crc32c::new();
                c.update(&stream[at..]);
                let mut d = c.digest();
                if p.bad_data_digest {
                    d[0] ^= 1;
                }
                stream.extend_from_slice(&d);
            }
        }
    }
    let mut wire = Script {
        bytes: stream,
        pos: 0,
        chunks: inp.chunks.clone(),
        k: 0,
    };
    for _ in 0..256 {
        if conn.receive(&mut wire, &mut out).is_err() {
            break;
        }
        conn.wake_rx();
        if conn.flush(&mut sink, &mut out).is_err() || wire.pos >= wire.bytes.len() {
            break;
        }
    }
    // Tear down as the session does after a lost connection, then give up.
    conn.requeue(&mut out);
    conn.fail_all(iscsi::IoError::Disconnected, &mut out);
    assert_eq!(conn.busy(), 0);
    assert_eq!(done.len(), cmds.len());
    for b in &bufs {
        assert!(
            b[..GUARD].iter().all(|&x| x == 0xa5),
            "write before a buffer"
        );
        assert!(
            b[b.len() - GUARD..].iter().all(|&x| x == 0xa5),
            "write after a buffer"
        );
    }
    let _ = Dir::None;
});
