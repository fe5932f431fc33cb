//! Unit tests of [`Conn`] with a scripted wire.
use super::*;
use crate::pdu::{op, BHS_LEN};

/// Serves scripted bytes in small reads and records what is written.
struct Script {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    written: Vec<u8>,
}

impl Wire for Script {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.pos == self.input.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut budget = self.chunk;
        let mut n = 0;
        for v in iov {
            let take = v.iov_len.min(budget).min(self.input.len() - self.pos);
            // SAFETY: the caller guarantees `v` is writable for its length.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.input[self.pos..].as_ptr(),
                    v.iov_base as *mut u8,
                    take,
                )
            };
            self.pos += take;
            budget -= take;
            n += take;
        }
        Ok(n)
    }

    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut n = 0;
        for v in iov {
            // SAFETY: the caller guarantees `v` is readable for its length.
            let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            self.written.extend_from_slice(b);
            n += v.iov_len;
        }
        Ok(n)
    }
}

/// Receives until the script is used up, as the session does: a short read makes the
/// connection wait for poll, which the test stands in for with `wake_rx`.
fn pump(
    c: &mut Conn,
    w: &mut Script,
    out: &mut impl FnMut(Completion),
) -> Result<usize, ConnError> {
    let mut n = 0;
    loop {
        n += c.receive(w, out)?;
        if w.pos == w.input.len() {
            n += c.receive(w, out)?;
            return Ok(n);
        }
        c.wake_rx();
    }
}

fn conn(p: impl FnOnce(&mut Params)) -> Conn {
    let mut params = Params::defaults(&crate::text::Offer::default());
    p(&mut params);
    let mut c = Conn::new(
        4,
        params.max_recv_data_segment,
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    c.bind(&LoggedIn {
        params,
        tsih: 1,
        cmd_sn: 10,
        exp_stat_sn: 5,
        max_cmd_sn: 20,
    });
    c
}

fn bhs(opcode: u8, flags: u8, itt: u32, dlen: u32) -> [u8; BHS_LEN] {
    let mut h = [0u8; BHS_LEN];
    h[0] = opcode;
    h[1] = flags;
    h[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);
    h[16..20].copy_from_slice(&itt.to_be_bytes());
    h[24..28].copy_from_slice(&5u32.to_be_bytes()); // StatSN
    h[28..32].copy_from_slice(&11u32.to_be_bytes()); // ExpCmdSN
    h[32..36].copy_from_slice(&30u32.to_be_bytes()); // MaxCmdSN
    h
}

#[test]
fn data_in_lands_in_the_iovecs() {
    let mut c = conn(|_| {});
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 3096];
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let cmd = Command::read(77, 1, scsi::read16(0, 8), 4096, iov.as_ptr(), 2);
    cmd.check().unwrap();
    c.enqueue(cmd);
    let mut w = Script {
        input: Vec::new(),
        pos: 0,
        chunk: 7,
        written: Vec::new(),
    };
    let mut done = Vec::new();
    c.flush(&mut w, &mut |x| done.push(x)).unwrap();
    assert_eq!(w.written.len(), BHS_LEN);
    assert_eq!(w.written[0], op::SCSI_CMD);
    let itt = c.itt_of(77).unwrap();
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let h1 = bhs(op::DATA_IN, 0, itt, 3000);
    let mut h2 = bhs(op::DATA_IN, 0x81, itt, 1096);
    h2[40..44].copy_from_slice(&3000u32.to_be_bytes());
    w.input.extend_from_slice(&h1);
    w.input.extend_from_slice(&payload[..3000]);
    w.input.extend_from_slice(&h2);
    w.input.extend_from_slice(&payload[3000..]);
    let n = pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        done,
        vec![Completion {
            tag: 77,
            result: Ok(4096)
        }]
    );
    assert_eq!([a, b].concat(), payload);
    assert_eq!(c.busy(), 0);
}

#[test]
fn r2t_is_answered_with_data_out() {
    let mut c = conn(|p| {
        p.immediate_data = false;
        p.initial_r2t = true;
        p.max_xmit_data_segment = 8192;
    });
    let data: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    }];
    c.enqueue(Command::write(
        5,
        1,
        scsi::write16(0, 40, false),
        20000,
        iov.as_ptr(),
        1,
    ));
    let mut w = Script {
        input: Vec::new(),
        pos: 0,
        chunk: 1 << 20,
        written: Vec::new(),
    };
    let mut done = Vec::new();
    c.flush(&mut w, &mut |x| done.push(x)).unwrap();
    assert_eq!(w.written.len(), BHS_LEN, "no immediate data");
    assert_eq!(&w.written[24..28], &10u32.to_be_bytes(), "CmdSN");
    let itt = c.itt_of(5).unwrap();
    let mut r2t = bhs(op::R2T, 0x80, itt, 0);
    r2t[20..24].copy_from_slice(&0x55u32.to_be_bytes());
    r2t[44..48].copy_from_slice(&20000u32.to_be_bytes());
    w.input.extend_from_slice(&r2t);
    w.written.clear();
    pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
    c.flush(&mut w, &mut |x| done.push(x)).unwrap();
    let mut at = 0;
    let mut got = Vec::new();
    for (k, len) in [8192usize, 8192, 3616].into_iter().enumerate() {
        let h = &w.written[at..at + BHS_LEN];
        assert_eq!(h[0], op::DATA_OUT);
        assert_eq!(h[1] & 0x80 != 0, k == 2, "F bit on the last PDU only");
        assert_eq!(&h[20..24], &0x55u32.to_be_bytes(), "TTT echoed");
        assert_eq!(&h[36..40], &(k as u32).to_be_bytes(), "DataSN");
        assert_eq!(&h[40..44], &((k * 8192) as u32).to_be_bytes(), "offset");
        got.extend_from_slice(&w.written[at + BHS_LEN..at + BHS_LEN + len]);
        at += BHS_LEN + len;
    }
    assert_eq!(at, w.written.len());
    assert_eq!(got, data);
    w.input.extend_from_slice(&bhs(op::SCSI_RSP, 0x80, itt, 0));
    pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
    assert_eq!(
        done,
        vec![Completion {
            tag: 5,
            result: Ok(20000)
        }]
    );
}

#[test]
fn hostile_pdus_close_the_connection() {
    let mut c = conn(|p| p.max_recv_data_segment = 8192);
    let mut buf = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    c.enqueue(Command::read(
        1,
        1,
        scsi::read16(0, 8),
        4096,
        iov.as_ptr(),
        1,
    ));
    let mut w = Script {
        input: Vec::new(),
        pos: 0,
        chunk: 4096,
        written: Vec::new(),
    };
    c.flush(&mut w, &mut |_| {}).unwrap();
    let case = |k: usize, itt: u32| -> (Vec<u8>, &str) {
        match k {
            0 => (
                bhs(op::DATA_IN, 0, itt, 9000).to_vec(),
                "exceeds the negotiated limit",
            ),
            1 => (
                bhs(op::DATA_IN, 0, itt ^ 0x10000, 512).to_vec(),
                "unknown task",
            ),
            2 => {
                let mut h = bhs(op::DATA_IN, 0, itt, 1024);
                h[40..44].copy_from_slice(&3584u32.to_be_bytes());
                (h.to_vec(), "out of order")
            }
            3 => (bhs(op::R2T, 0x80, itt, 0).to_vec(), "R2T"),
            _ => (bhs(op::LOGIN_RSP, 0x80, 0, 0).to_vec(), "unexpected PDU"),
        }
    };
    for k in 0..5 {
        let (input, want) = case(k, c.itt_of(1).unwrap());
        let mut w = Script {
            input,
            pos: 0,
            chunk: 4096,
            written: Vec::new(),
        };
        let e = pump(&mut c, &mut w, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
        // As after a lost connection: forget the wire, keep the command.
        c.requeue(&mut |_| {});
        let mut sink = Script {
            input: Vec::new(),
            pos: 0,
            chunk: 1,
            written: Vec::new(),
        };
        c.flush(&mut sink, &mut |_| {}).unwrap();
    }
    let mut failed = Vec::new();
    c.fail_all(IoError::Disconnected, &mut |x| failed.push(x));
    assert_eq!(
        failed,
        vec![Completion {
            tag: 1,
            result: Err(IoError::Disconnected)
        }]
    );
    let _ = &mut buf;
}
