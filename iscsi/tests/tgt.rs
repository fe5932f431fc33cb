//! The initiator against a real Debian `tgtd` on loopback: each test starts its own private
//! daemon ([`iscsi::lab::Tgtd`], stopped on drop even when the test fails) with one target
//! whose LUN 1 is a file.

use std::time::{Duration, Instant};

use iscsi::lab::{Tgtd, TgtdOptions, TARGET};
use iscsi::{
    scsi, Chap, Client, Command, Completion, Config, Drive, Error, IoError, Session, State,
};

const BS: u32 = 512;

fn tgtd(opts: TgtdOptions) -> Tgtd {
    assert!(
        Tgtd::available(),
        "tgtd is not installed: apt-get install tgt (CI installs it)"
    );
    Tgtd::start(opts).expect("starting tgtd")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads the LUN file directly, as the target stored it.
fn file_bytes(t: &Tgtd, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&t.lun_file).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

#[test]
fn discovery_lists_the_target() {
    let t = tgtd(TgtdOptions::default());
    let found = iscsi::discover(&t.config()).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, TARGET);
    assert!(
        found[0]
            .addresses
            .iter()
            .any(|a| a.starts_with(&format!("127.0.0.1:{}", t.port))),
        "{found:?}"
    );
}

#[test]
fn scsi_commands() {
    let t = tgtd(TgtdOptions {
        thin_provisioning: true,
        ..Default::default()
    });
    let mut c = Client::connect(&t.config(), 1).unwrap();
    c.test_unit_ready().unwrap();
    let inq = c.inquiry().unwrap();
    assert_eq!(inq.device_type, 0);
    assert_eq!(inq.vendor, "IET");
    let cap = c.read_capacity16().unwrap();
    assert_eq!(cap.block_size, BS);
    assert_eq!(cap.bytes(), t.size);
    assert!(cap.thin_provisioned);
    let luns = c.report_luns().unwrap();
    assert!(luns.contains(&1), "{luns:?}");
    // Write, flush, unmap and read back.
    let data = pattern(1, 64 * 1024);
    c.write16(100, &data, BS, false).unwrap();
    c.synchronize_cache16().unwrap();
    assert_eq!(file_bytes(&t, 100 * 512, data.len()), data);
    let mut back = vec![0u8; data.len()];
    c.read16(100, &mut back, BS).unwrap();
    assert_eq!(back, data);
    c.write16(300, &data[..4096], BS, true).unwrap();
    c.unmap(100, 128).unwrap();
    c.read16(100, &mut back, BS).unwrap();
    assert!(back.iter().all(|&b| b == 0), "UNMAP did not zero the range");
    // Errors come back named.
    let end = cap.blocks;
    let e = c.read16(end, &mut back[..512], BS).unwrap_err();
    assert!(
        e.to_string()
            .contains("ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE"),
        "{e}"
    );
    assert!(matches!(
        e,
        Error::Command(IoError::Check(s)) if s.key == 5 && s.asc == 0x21
    ));
    // The session survives command errors.
    c.read16(0, &mut back[..512], BS).unwrap();
    c.close();
}

#[test]
fn unmap_without_thin_provisioning_is_a_clear_error() {
    let t = tgtd(TgtdOptions::default());
    let mut c = Client::connect(&t.config(), 1).unwrap();
    let e = c.unmap(0, 8).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("CHECK CONDITION: ILLEGAL REQUEST"),
        "{e}"
    );
}

#[test]
fn chap_login() {
    let user = "tapdisk";
    let secret = "s3cret-s3cret-16";
    let t = tgtd(TgtdOptions {
        chap: Some((user.into(), secret.into())),
        ..Default::default()
    });
    let mut cfg = t.config();
    cfg.chap = Some(Chap {
        user: user.into(),
        secret: secret.into(),
    });
    let mut c = Client::connect(&cfg, 1).unwrap();
    c.test_unit_ready().unwrap();
    c.close();

    cfg.chap = Some(Chap {
        user: user.into(),
        secret: "wrong-secret-123".into(),
    });
    let e = Client::connect(&cfg, 1)
        .err()
        .expect("wrong secret must fail");
    assert!(matches!(e, Error::AuthFailed { .. }), "{e:?}");
    assert!(e.to_string().contains("wrong user name or secret"), "{e}");

    cfg.chap = None;
    let e = Client::connect(&cfg, 1)
        .err()
        .expect("no credentials must fail");
    assert!(e.to_string().contains("requires authentication"), "{e}");

    // tgt asks no authentication for discovery (the account is bound to the target only).
    assert_eq!(iscsi::discover(&cfg).unwrap()[0].name, TARGET);
}

#[test]
fn wrong_target_name_is_a_clear_error() {
    let t = tgtd(TgtdOptions::default());
    let cfg = Config::new(t.portal(), "iqn.2026-11.rs.tapdisk:nosuch");
    let e = Client::connect(&cfg, 1).err().unwrap();
    assert!(e.to_string().contains("target not found"), "{e}");
}

/// Writes and reads many sizes through scattered iovecs and checks the content, with the
/// given negotiation.
fn sizes_roundtrip(cfg: &Config, t: &Tgtd) {
    let mut s = Session::connect(cfg).unwrap();
    let sizes = [
        512usize,
        4096,
        8192 + 512,
        65536,
        65536 + 4096,
        262144,
        1 << 20,
        3 << 20,
    ];
    let mut lba = 0u64;
    for (k, &size) in sizes.iter().enumerate() {
        let data = pattern(k as u64 + 10, size);
        // Scatter into uneven pieces (multiples of 512 and odd sizes).
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut at = 0;
        let mut n = 0;
        while at < size {
            let len = [4096usize, 512, 1000, 24, 8192 + 7][n % 5].min(size - at);
            pieces.push(data[at..at + len].to_vec());
            at += len;
            n += 1;
        }
        let iov: Vec<libc::iovec> = pieces
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            })
            .take(iscsi::conn::MAX_IOV)
            .collect();
        let covered: usize = iov.iter().map(|v| v.iov_len).sum();
        let (iov, data) = if covered < size {
            // Too many pieces: one buffer instead.
            (
                vec![libc::iovec {
                    iov_base: data.as_ptr() as *mut _,
                    iov_len: size,
                }],
                data.clone(),
            )
        } else {
            (iov, data.clone())
        };
        let blocks = (size / 512) as u32;
        let cmd = Command::write(
            1,
            1,
            scsi::write16(lba, blocks, false),
            size as u32,
            iov.as_ptr(),
            iov.len() as u32,
        );
        // SAFETY: buffers live until the completion is popped below.
        unsafe { s.submit(cmd) }.unwrap();
        let c = wait(&mut s, 1);
        assert_eq!(c.result, Ok(size as u32), "write of {size}");
        assert_eq!(
            file_bytes(t, lba * 512, size),
            data,
            "stored content of {size}"
        );
        // Read back into scattered buffers.
        let mut rpieces: Vec<Vec<u8>> = (0..3)
            .map(|i| vec![0u8; [size / 2, size / 4, size - size / 2 - size / 4][i]])
            .collect();
        let riov: Vec<libc::iovec> = rpieces
            .iter_mut()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr() as *mut _,
                iov_len: p.len(),
            })
            .collect();
        let cmd = Command::read(
            2,
            1,
            scsi::read16(lba, blocks),
            size as u32,
            riov.as_ptr(),
            riov.len() as u32,
        );
        // SAFETY: buffers live until the completion is popped below.
        unsafe { s.submit(cmd) }.unwrap();
        let c = wait(&mut s, 2);
        assert_eq!(c.result, Ok(size as u32), "read of {size}");
        let back: Vec<u8> = rpieces.concat();
        assert!(back == data, "read-back content of {size} differs");
        lba += blocks as u64 + 8;
    }
    s.close();
}

fn wait(s: &mut Session, tag: u32) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = s.pop_completion() {
            assert_eq!(c.tag, tag);
            return c;
        }
        assert!(Instant::now() < deadline, "no completion for tag {tag}");
        s.wait(Some(Duration::from_millis(100)));
    }
}

#[test]
fn sizes_with_immediate_and_unsolicited_data() {
    let t = tgtd(TgtdOptions::default());
    sizes_roundtrip(&t.config(), &t);
}

#[test]
fn sizes_with_unsolicited_data_out() {
    let t = tgtd(TgtdOptions {
        target_params: vec![
            ("InitialR2T".into(), "No".into()),
            ("FirstBurstLength".into(), "131072".into()),
        ],
        ..Default::default()
    });
    let cfg = t.config();
    let s = Session::connect(&cfg).unwrap();
    let p = *s.params();
    assert!(!p.initial_r2t && p.immediate_data, "{p:?}");
    assert_eq!(p.first_burst, 131072, "{p:?}");
    drop(s);
    sizes_roundtrip(&cfg, &t);
}

#[test]
fn sizes_inline() {
    let t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = Drive::Inline;
    sizes_roundtrip(&cfg, &t);
}

#[test]
fn sizes_with_r2t_only() {
    let t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.offer.immediate_data = false;
    cfg.offer.initial_r2t = true;
    cfg.offer.max_recv_data_segment = 8192;
    sizes_roundtrip(&cfg, &t);
}

#[test]
fn sizes_with_digests() {
    let t = tgtd(TgtdOptions {
        digests: true,
        ..Default::default()
    });
    let mut cfg = t.config();
    cfg.offer.header_digest = true;
    cfg.offer.data_digest = true;
    let s = Session::connect(&cfg).unwrap();
    assert!(
        s.params().header_digest && s.params().data_digest,
        "{:?}",
        s.params()
    );
    drop(s);
    sizes_roundtrip(&cfg, &t);
}

/// Keeps `depth` random writes then reads in flight; checks every block.
fn many_in_flight(s: &mut Session, blocks_total: u64, ios: usize, depth: usize, seed: u64) {
    let io_blocks = 8u64; // 4 KiB
    let slots = (blocks_total / io_blocks) as usize;
    let mut shadow: Vec<u8> = vec![0; slots]; // generation written to each 4 KiB slot
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; 4096]).collect();
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut _,
            iov_len: 4096,
        })
        .collect();
    let mut busy: Vec<Option<(usize, bool, u8)>> = vec![None; depth];
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut issued = 0;
    let mut done = 0;
    let mut in_flight = 0;
    let deadline = Instant::now() + Duration::from_secs(25);
    let fill = |b: &mut [u8], slot: usize, gen: u8| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (slot as u8) ^ gen ^ (i as u8).wrapping_mul(31);
        }
    };
    while done < ios {
        assert!(
            Instant::now() < deadline,
            "many_in_flight stuck: {done}/{ios}"
        );
        for tag in 0..depth {
            if busy[tag].is_some() || issued >= ios {
                continue;
            }
            // Never two commands on one slot at once.
            let slot = loop {
                let sl = (next() % slots as u64) as usize;
                if !busy.iter().flatten().any(|(s2, _, _)| *s2 == sl) {
                    break sl;
                }
            };
            let write = next() % 2 == 0;
            let lba = slot as u64 * io_blocks;
            let cmd = if write {
                let gen = shadow[slot].wrapping_add(1).max(1);
                fill(&mut bufs[tag], slot, gen);
                busy[tag] = Some((slot, true, gen));
                Command::write(
                    tag as u32,
                    1,
                    scsi::write16(lba, 8, false),
                    4096,
                    &iovs[tag],
                    1,
                )
            } else {
                busy[tag] = Some((slot, false, shadow[slot]));
                Command::read(tag as u32, 1, scsi::read16(lba, 8), 4096, &iovs[tag], 1)
            };
            // SAFETY: bufs/iovs outlive the completions, which this loop waits for.
            unsafe { s.submit(cmd) }.unwrap();
            issued += 1;
            in_flight += 1;
        }
        s.wait(Some(Duration::from_millis(100)));
        while let Some(c) = s.pop_completion() {
            let tag = c.tag as usize;
            let (slot, write, gen) = busy[tag].take().expect("completion for an idle tag");
            assert_eq!(c.result, Ok(4096), "tag {tag}");
            if write {
                shadow[slot] = gen;
            } else if gen != 0 {
                let mut want = vec![0u8; 4096];
                fill(&mut want, slot, gen);
                assert!(bufs[tag] == want, "slot {slot} read back wrong data");
            }
            done += 1;
            in_flight -= 1;
        }
    }
    assert_eq!(in_flight, 0);
    let _ = &mut iovs;
}

#[test]
fn many_commands_in_flight() {
    many_commands_in_flight_with(Drive::Thread);
}

#[test]
fn many_commands_in_flight_inline() {
    many_commands_in_flight_with(Drive::Inline);
}

fn many_commands_in_flight_with(drive: Drive) {
    let t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = drive;
    cfg.queue_depth = 64;
    let mut s = Session::connect(&cfg).unwrap();
    many_in_flight(&mut s, t.size / 512, 20_000, 64, 7);
    assert_eq!(s.state(), State::Up);
}

#[test]
fn keepalive_pings() {
    keepalive_pings_with(Drive::Thread);
}

#[test]
fn keepalive_pings_inline() {
    keepalive_pings_with(Drive::Inline);
}

fn keepalive_pings_with(drive: Drive) {
    let t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = drive;
    cfg.nop_interval = Duration::from_millis(100);
    cfg.nop_timeout = Duration::from_millis(1000);
    let mut c = Client::connect(&cfg, 1).unwrap();
    // Idle, as a caller's event loop would be: asleep until the session needs it.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        c.session_mut().wait(Some(
            Duration::from_millis(800).saturating_sub(t0.elapsed()),
        ));
    }
    assert!(c.session().stats().pings >= 3, "{:?}", c.session().stats());
    assert_eq!(c.session().state(), State::Up);
    assert_eq!(c.session().reconnects(), 0);
    c.test_unit_ready().unwrap();
}

#[test]
fn target_killed_mid_io_fails_in_flight_commands() {
    target_killed_mid_io_fails_in_flight_commands_with(Drive::Thread);
}

#[test]
fn target_killed_mid_io_fails_in_flight_commands_inline() {
    target_killed_mid_io_fails_in_flight_commands_with(Drive::Inline);
}

fn target_killed_mid_io_fails_in_flight_commands_with(drive: Drive) {
    let mut t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = drive;
    cfg.reconnect_timeout = Duration::from_millis(1500);
    cfg.login_timeout = Duration::from_millis(500);
    let mut s = Session::connect(&cfg).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    for tag in 0..8 {
        let cmd = Command::write(
            tag,
            1,
            scsi::write16(u64::from(tag) * 2048, 2048, false),
            1 << 20,
            &iov,
            1,
        );
        // SAFETY: `buf` lives until every completion is popped.
        unsafe { s.submit(cmd) }.unwrap();
    }
    t.kill();
    let start = Instant::now();
    let mut got = 0;
    let mut failed = 0;
    while got < 8 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "hung after the target died"
        );
        s.wait(Some(Duration::from_millis(100)));
        while let Some(c) = s.pop_completion() {
            got += 1;
            if c.result == Err(IoError::Disconnected) {
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "killing the target failed nothing");
    assert_eq!(s.state(), State::Down);
    // A command while the target is down fails fast.
    let mut c2 = vec![0u8; 512];
    let iov2 = libc::iovec {
        iov_base: c2.as_mut_ptr() as *mut _,
        iov_len: 512,
    };
    std::thread::sleep(cfg.reconnect_interval);
    // SAFETY: c2 lives until the completion is popped.
    unsafe { s.submit(Command::read(99, 1, scsi::read16(0, 1), 512, &iov2, 1)) }.unwrap();
    let t0 = Instant::now();
    let c = wait(&mut s, 99);
    assert_eq!(c.result, Err(IoError::Disconnected));
    assert!(t0.elapsed() < Duration::from_secs(2));
    if drive == Drive::Inline {
        // No login is due yet: `send` fails it at once, and the poll fd shows the completion
        // (an event loop that polls next must come back for it).
        // SAFETY: as above.
        unsafe { s.submit(Command::read(98, 1, scsi::read16(0, 1), 512, &iov2, 1)) }.unwrap();
        s.send();
        let mut p = libc::pollfd {
            fd: s.poll_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        assert_eq!(n, 1, "a completion queued by send left the poll fd quiet");
        assert_eq!(wait(&mut s, 98).result, Err(IoError::Disconnected));
    }
    // The server comes back: IO resumes.
    t.spawn().unwrap();
    std::thread::sleep(cfg.reconnect_interval);
    // SAFETY: as above.
    unsafe { s.submit(Command::read(100, 1, scsi::read16(0, 1), 512, &iov2, 1)) }.unwrap();
    let c = wait(&mut s, 100);
    assert_eq!(c.result, Ok(512));
    assert_eq!(s.state(), State::Up);
    let _ = &mut c2;
}

#[test]
fn target_restarted_mid_io_retries_in_flight_commands() {
    target_restarted_mid_io_retries_in_flight_commands_with(Drive::Thread);
}

#[test]
fn target_restarted_mid_io_retries_in_flight_commands_inline() {
    target_restarted_mid_io_retries_in_flight_commands_with(Drive::Inline);
}

fn target_restarted_mid_io_retries_in_flight_commands_with(drive: Drive) {
    let mut t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = drive;
    cfg.reconnect_timeout = Duration::from_secs(10);
    cfg.queue_depth = 32;
    let mut s = Session::connect(&cfg).unwrap();
    let n = 32u32;
    let size = 256 * 1024;
    let bufs: Vec<Vec<u8>> = (0..n).map(|i| pattern(u64::from(i) + 100, size)).collect();
    let iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: size,
        })
        .collect();
    for tag in 0..n {
        let lba = u64::from(tag) * (size as u64 / 512);
        let cmd = Command::write(
            tag,
            1,
            scsi::write16(lba, (size / 512) as u32, false),
            size as u32,
            &iovs[tag as usize],
            1,
        );
        // SAFETY: `bufs` lives until every completion is popped.
        unsafe { s.submit(cmd) }.unwrap();
    }
    t.kill();
    std::thread::sleep(Duration::from_millis(300));
    t.spawn().unwrap();
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "hung after the restart"
        );
        s.wait(Some(Duration::from_millis(100)));
        while let Some(c) = s.pop_completion() {
            assert_eq!(c.result, Ok(size as u32), "tag {}", c.tag);
            got += 1;
        }
    }
    for tag in 0..n {
        let lba = u64::from(tag) * (size as u64 / 512);
        assert!(
            file_bytes(&t, lba * 512, size) == bufs[tag as usize],
            "tag {tag} lost its write"
        );
    }
    assert!(s.reconnects() >= 1);
}

#[test]
fn hung_target_fails_commands_and_recovers() {
    hung_target_fails_commands_and_recovers_with(Drive::Thread);
}

#[test]
fn hung_target_fails_commands_and_recovers_inline() {
    hung_target_fails_commands_and_recovers_with(Drive::Inline);
}

fn hung_target_fails_commands_and_recovers_with(drive: Drive) {
    let t = tgtd(TgtdOptions::default());
    let mut cfg = t.config();
    cfg.drive = drive;
    cfg.command_timeout = Duration::from_millis(600);
    cfg.nop_interval = Duration::from_secs(60); // the command timeout must catch it
    cfg.login_timeout = Duration::from_millis(300);
    cfg.reconnect_timeout = Duration::from_millis(800);
    let mut s = Session::connect(&cfg).unwrap();
    let mut buf = vec![0u8; 4096];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut _,
        iov_len: buf.len(),
    };
    t.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    // SAFETY: `buf` lives until the completion is popped.
    unsafe { s.submit(Command::read(1, 1, scsi::read16(0, 8), 4096, &iov, 1)) }.unwrap();
    let c = wait(&mut s, 1);
    t.signal(libc::SIGCONT);
    assert_eq!(c.result, Err(IoError::Disconnected));
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    // The target answers again: the next command logs in anew and succeeds.
    std::thread::sleep(cfg.reconnect_interval);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: as above.
        unsafe { s.submit(Command::read(2, 1, scsi::read16(0, 8), 4096, &iov, 1)) }.unwrap();
        if wait(&mut s, 2).result == Ok(4096) {
            break;
        }
        assert!(Instant::now() < deadline, "IO did not resume after SIGCONT");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.state(), State::Up);
    let _ = &mut buf;
}
