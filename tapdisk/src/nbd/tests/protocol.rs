//! The protocol driven byte by byte, malformed input included.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::super::proto::*;
use super::*;

#[test]
fn handshake_options() {
    let fx = Fixture::new(MIB, false);
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    c.send_opt(OPT_LIST, &[]);
    let (o, rep, d) = c.opt_reply();
    assert_eq!((o, rep), (OPT_LIST, REP_SERVER));
    assert_eq!(be32(&d) as usize, EXPORT.len());
    assert_eq!(&d[4..], EXPORT.as_bytes());
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.send_opt(OPT_LIST, b"junk");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);

    for opt in [
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        OPT_LIST_META_CONTEXT,
        4242,
    ] {
        c.send_opt(opt, &[1, 2, 3]);
        let (o, rep, _) = c.opt_reply();
        assert_eq!((o, rep), (opt, REP_ERR_UNSUP), "option {opt}");
    }

    assert_eq!(c.info(OPT_INFO, b"nope", &[]), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.info(OPT_GO, b"nope", &[]), Err(REP_ERR_UNKNOWN));
    // Malformed: name length beyond the data, odd item list.
    c.send_opt(OPT_INFO, &[0, 0, 0, 200, b'a']);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    let mut bad = Raw::<UnixStream>::info_data(b"", &[1, 2]);
    bad.push(0);
    c.send_opt(OPT_GO, &bad);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);

    let infos = c
        .info(OPT_INFO, EXPORT.as_bytes(), &[INFO_NAME, INFO_DESCRIPTION])
        .unwrap();
    let name = infos
        .iter()
        .find(|i| be16(i) == INFO_NAME)
        .expect("INFO_NAME");
    assert_eq!(&name[2..], EXPORT.as_bytes());
    assert!(infos.iter().any(|i| be16(i) == INFO_DESCRIPTION));
    let (size, flags) = c.go(EXPORT.as_bytes()).unwrap();
    assert_eq!(size, MIB);
    let want = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    c.write(1, 4096, &[0xab; 512], 0);
    assert_eq!(c.reply(1), 0);
    assert_eq!(c.read(2, 4096, 512), vec![0xab; 512]);
    c.disconnect();

    // Soft disconnect during the handshake.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    c.assert_closed();
    assert_alive(&fx.sock);
}

#[test]
fn export_name_option() {
    let fx = Fixture::new(2 * MIB, false);
    // With NO_ZEROES: size and flags only.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes());
    let d = c.raw(10);
    assert_eq!(be64(&d), 2 * MIB);
    assert_ne!(be16(&d[8..]) & TF_HAS_FLAGS, 0);
    assert_eq!(c.read(1, 0, 4096), vec![0; 4096]);
    c.disconnect();
    // Without: 124 zero bytes follow.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(OPT_EXPORT_NAME, b"");
    let d = c.raw(10 + 124);
    assert_eq!(be64(&d), 2 * MIB);
    assert!(d[10..].iter().all(|&b| b == 0));
    c.read(1, 0, 512);
    c.disconnect();
    // Unknown name: the server must hang up.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_opt(OPT_EXPORT_NAME, b"other");
    c.assert_closed();
    assert_alive(&fx.sock);
}

#[test]
fn malformed_handshakes_close_cleanly() {
    let fx = Fixture::new(MIB, false);
    let fresh = || {
        let mut c = Raw::unix(&fx.sock);
        c.greeting();
        c
    };
    // Unknown client flags.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | 0x100);
    c.assert_closed();
    assert_alive(&fx.sock);
    // Not fixed newstyle.
    let mut c = fresh();
    c.send_flags(0);
    c.assert_closed();
    assert_alive(&fx.sock);
    // Bad option magic.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0xde; 16]).unwrap();
    c.assert_closed();
    assert_alive(&fx.sock);
    // Absurd option length: TOO_BIG, then the server hangs up without reading the data.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.s.write_all(&h).unwrap();
    let (o, rep, msg) = c.opt_reply();
    assert_eq!((o, rep), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(String::from_utf8_lossy(&msg).contains("limit"));
    c.assert_closed();
    assert_alive(&fx.sock);
    // The same for OPT_EXPORT_NAME, which has no error reply.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    h.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.s.write_all(&h).unwrap();
    c.assert_closed();
    assert_alive(&fx.sock);
    // Truncated option data, then EOF.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&100u32.to_be_bytes());
    h.extend_from_slice(&[0; 10]);
    c.s.write_all(&h).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // Truncated client flags, truncated option header, and a client that just leaves.
    let mut c = fresh();
    c.s.write_all(&[0, 0]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    drop(UnixStream::connect(&fx.sock).unwrap());
    assert_alive(&fx.sock);
    wait_for("connections to end", || fx.server().connections() == 0);
}

#[test]
fn transmission_errors() {
    let fx = Fixture::new(MIB, false);
    let (mut c, size, _) = Raw::ready(&fx.sock);
    assert_eq!(size, MIB);
    // Unknown command: EINVAL (the protocol says so), and the connection goes on.
    c.req(42, 0, 1, 0, 512);
    assert_eq!(c.reply(1), EINVAL);
    c.req(7, 0, 2, 0, 512); // BLOCK_STATUS without negotiation
    assert_eq!(c.reply(2), EINVAL);
    // Out-of-range read, overflowing offset, zero length, unknown flag, oversize read.
    c.req(CMD_READ, 0, 3, MIB - 512, 1024);
    assert_eq!(c.reply(3), EINVAL);
    c.req(CMD_READ, 0, 4, u64::MAX - 100, 512);
    assert_eq!(c.reply(4), EINVAL);
    c.req(CMD_READ, 0, 5, 0, 0);
    assert_eq!(c.reply(5), EINVAL);
    c.req(CMD_READ, 1 << 2, 6, 0, 512);
    assert_eq!(c.reply(6), EINVAL);
    c.req(CMD_READ, 0, 7, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.reply(7), EINVAL);
    // Writes past the end: ENOSPC, payload consumed.
    c.write(8, MIB - 512, &[1; 1024], 0);
    assert_eq!(c.reply(8), ENOSPC);
    c.req(CMD_WRITE_ZEROES, 0, 9, MIB, 512);
    assert_eq!(c.reply(9), ENOSPC);
    c.req(CMD_TRIM, 0, 10, MIB, 512);
    assert_eq!(c.reply(10), EINVAL);
    // Write with an unknown flag: EINVAL, payload consumed, nothing written.
    c.write(11, 0, &[2; 512], 1 << 4);
    assert_eq!(c.reply(11), EINVAL);
    c.req(CMD_FLUSH, 1 << 3, 12, 0, 0);
    assert_eq!(c.reply(12), EINVAL);
    // FUA on a read is ignored (clients are known to send it).
    c.req(CMD_READ, CMD_FLAG_FUA, 13, 0, 512);
    assert_eq!(c.reply(13), 0);
    assert_eq!(c.data(512), vec![0; 512]);
    // Oversize write: EINVAL, then the server hangs up.
    c.req(CMD_WRITE, 0, 14, 0, MAX_PAYLOAD + 512);
    assert_eq!(c.reply(14), EINVAL);
    c.assert_closed();
    assert!(fx.image().iter().all(|&b| b == 0));
    assert_alive(&fx.sock);

    // Bad request magic.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.s.write_all(&[0x55; REQUEST_LEN]).unwrap();
    c.assert_closed();
    // Truncated header.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.s.write_all(
        &Request {
            flags: 0,
            cmd: 0,
            handle: 1,
            offset: 0,
            len: 512,
        }
        .encode()[..20],
    )
    .unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // Truncated write payload.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.req(CMD_WRITE, 0, 1, 0, 4096);
    c.s.write_all(&[3; 100]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // A client that closes without CMD_DISC.
    let (c, _, _) = Raw::ready(&fx.sock);
    drop(c);
    assert_alive(&fx.sock);
    assert!(fx.image().iter().all(|&b| b == 0));
}

#[test]
fn read_only_export() {
    let fx = Fixture::new(MIB, true);
    std::fs::write(&fx.img, vec![0x11u8; MIB as usize]).unwrap();
    let (mut c, _, flags) = Raw::ready(&fx.sock);
    assert_ne!(flags & TF_READ_ONLY, 0);
    c.write(1, 0, &[9; 4096], 0);
    assert_eq!(c.reply(1), EPERM);
    c.req(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(c.reply(2), EPERM);
    c.req(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(c.reply(3), EPERM);
    assert_eq!(c.read(4, 0, 4096), vec![0x11; 4096]);
    c.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.reply(5), 0);
    c.disconnect();
    assert!(fx.image().iter().all(|&b| b == 0x11));
}

#[test]
fn pipelined_requests() {
    let fx = Fixture::new(4 * MIB, false);
    let (mut c, _, _) = Raw::ready(&fx.sock);
    // Everything sent before any reply is read.
    let big: Vec<u8> = (0..(2 * MIB) as usize).map(|i| (i % 251) as u8).collect();
    c.write(1, 0, &big, 0);
    c.write(2, 2 * MIB, &[0x77; 8192], CMD_FLAG_FUA);
    c.req(CMD_READ, 0, 3, 2 * MIB, 8192);
    c.req(CMD_TRIM, CMD_FLAG_FUA, 4, 2 * MIB, 4096);
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 0, 4096);
    c.req(CMD_FLUSH, 0, 6, 0, 0);
    c.req(CMD_READ, 0, 7, 0, 8192);
    assert_eq!(c.reply(1), 0);
    assert_eq!(c.reply(2), 0);
    assert_eq!(c.reply(3), 0);
    assert_eq!(c.data(8192), vec![0x77; 8192]);
    assert_eq!(c.reply(4), 0);
    assert_eq!(c.reply(5), 0);
    assert_eq!(c.reply(6), 0);
    assert_eq!(c.reply(7), 0);
    let d = c.data(8192);
    assert_eq!(&d[..4096], &[0; 4096][..]);
    assert_eq!(&d[4096..], &big[4096..8192]);
    c.disconnect();
    let img = fx.image();
    assert_eq!(&img[..4096], &[0; 4096][..]);
    assert_eq!(&img[4096..2 * MIB as usize], &big[4096..]);
    assert_eq!(
        &img[(2 * MIB) as usize..(2 * MIB + 4096) as usize],
        &[0; 4096][..]
    );
    assert_eq!(
        &img[(2 * MIB + 4096) as usize..(2 * MIB + 8192) as usize],
        &[0x77; 4096][..]
    );
}
