//! The server: shutdown, socket paths, TCP, connection limits, idle buffers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::super::proto::*;
use super::super::*;
use super::*;

#[test]
fn shutdown_disconnects_clients_and_removes_socket() {
    let mut fx = Fixture::new(MIB, false);
    let mut idle = Raw::unix(&fx.sock); // stuck in the handshake
    idle.greeting();
    let (mut busy, _, _) = Raw::ready(&fx.sock);
    busy.read(1, 0, 512);
    wait_for("2 connections", || fx.server().connections() == 2);
    let server = fx.server.take().unwrap();
    let t = Instant::now();
    server.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(!fx.sock.exists(), "socket left behind");
    idle.assert_closed();
    busy.assert_closed();

    // Dropping a server shuts it down too.
    let server = start_unix(&fx.img, &fx.sock, false);
    let (mut c, _, _) = Raw::ready(&fx.sock);
    drop(server);
    c.assert_closed();
    assert!(!fx.sock.exists());
}

#[test]
fn unix_socket_path_handling() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    // A stale socket (its listener is gone) is replaced.
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = start_unix(&img, &sock, false);
    assert_eq!(server.local_addr(), NbdListen::Unix(sock.clone()));
    assert_alive(&sock);
    // A live socket is not stolen.
    let target = export(&img, false);
    let e =
        NbdServer::start(&NbdListen::Unix(sock.clone()), target.clone(), test_log()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert_alive(&sock);
    server.shutdown();
    // A regular file is an error and stays as it was.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let e =
        NbdServer::start(&NbdListen::Unix(file.clone()), target.clone(), test_log()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A missing directory is an error naming the path.
    let e = NbdServer::start(
        &NbdListen::Unix(dir.path().join("no/such/dir.sock")),
        target,
        test_log(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no/such/dir.sock"), "{e}");
}

#[test]
fn tcp_port_zero_and_connection_count() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let listen: NbdListen = "tcp:127.0.0.1:0".parse().unwrap();
    let server = NbdServer::start(&listen, export(&img, false), test_log()).unwrap();
    let NbdListen::Tcp(addr) = server.local_addr() else {
        panic!("not tcp")
    };
    assert_ne!(addr.port(), 0);
    assert!(addr.ip().is_loopback());
    assert_eq!(
        server.local_addr().to_string(),
        format!("tcp:127.0.0.1:{}", addr.port())
    );
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Raw::new(s);
        c.greeting();
        c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(c.go(EXPORT.as_bytes()).unwrap().0, MIB);
        c.write(1, u64::from(i) * 4096, &[i + 1; 4096], 0);
        assert_eq!(c.reply(1), 0);
        clients.push(c);
    }
    wait_for("3 connections", || server.connections() == 3);
    for (i, mut c) in clients.into_iter().enumerate() {
        assert_eq!(c.read(2, i as u64 * 4096, 4096), vec![i as u8 + 1; 4096]);
        c.disconnect();
    }
    wait_for("0 connections", || server.connections() == 0);
    server.shutdown();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
}

#[test]
fn the_connection_limit_and_the_handshake_deadline_keep_idle_clients_from_locking_others_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let server = start_unix(&img, &sock, false);
    // MAX_CONNECTIONS clients connect and say nothing.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    wait_for("all idle clients counted", || {
        server.connections() == MAX_CONNECTIONS
    });
    // They are dropped when the handshake deadline passes; then clients are served.
    let t = Instant::now();
    wait_for("idle clients dropped", || server.connections() == 0);
    assert!(
        t.elapsed() >= HANDSHAKE_DEADLINE - Duration::from_millis(500),
        "dropped after {:?}, before the deadline",
        t.elapsed()
    );
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The greeting was sent, then the connection closed.
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 18, "greeting then EOF");
    }
    assert_alive(&sock);
    // A client that takes its time in transmission (after the handshake) is not dropped.
    let (mut c, _, _) = Raw::ready(&sock);
    std::thread::sleep(HANDSHAKE_DEADLINE + Duration::from_millis(500));
    assert_eq!(c.read(5, 0, 512), vec![0u8; 512]);
    c.disconnect();
    server.shutdown();
}

#[test]
fn idle_clients_give_their_large_buffers_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let server = start_unix(&img, &sock, false);
    let (mut a, _, _) = Raw::ready(&sock);
    let (mut b, _, _) = Raw::ready(&sock);
    let data: Vec<u8> = (0..8 * MIB as usize).map(|i| (i / 4099) as u8).collect();
    a.write(1, 0, &data, 0);
    assert_eq!(a.reply(1), 0);
    assert_eq!(b.read(2, 0, 4 << 20), data[..4 << 20]);
    // Both now hold a buffer of their largest request, until they have been idle a while.
    assert!(server.buffered() >= 12 * MIB, "{}", server.buffered());
    wait_for("idle buffers released", || server.buffered() == 0);
    // Small requests keep a small buffer even when idle; large ones come back as needed.
    assert_eq!(a.read(3, 4096, 4096), data[4096..8192]);
    std::thread::sleep(IDLE_RELEASE * 3);
    assert_eq!(server.buffered(), 4096);
    assert_eq!(
        b.read(4, MIB, 2 << 20),
        data[MIB as usize..3 * MIB as usize]
    );
    // A client that stalls inside a request (half a payload) is waited for, not dropped.
    a.req(CMD_WRITE, 0, 5, 0, 8192);
    a.s.write_all(&data[..4096]).unwrap();
    std::thread::sleep(IDLE_RELEASE * 3);
    a.s.write_all(&data[4096..8192]).unwrap();
    assert_eq!(a.reply(5), 0);
    a.disconnect();
    b.disconnect();
    wait_for("buffers freed at disconnect", || server.buffered() == 0);
    server.shutdown();
}
