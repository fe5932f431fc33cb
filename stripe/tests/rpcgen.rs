//! `stripe/master.x` is a real ONC RPC interface: rpcgen turns it into a C client (linked with
//! libtirpc) that registers, allocates and lists against our master. Needs rpcgen
//! (`rpcsvc-proto`), libtirpc-dev and gcc, which CI installs; skipped with a message otherwise.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use stripe::master::Store;
use stripe::master_server::Master;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

#[test]
fn a_c_client_generated_by_rpcgen_talks_to_the_master() {
    if !have("rpcgen") || !have("gcc") || !Path::new("/usr/include/tirpc/rpc/rpc.h").exists() {
        eprintln!("skipped: needs rpcgen (rpcsvc-proto), libtirpc-dev and gcc");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(src.join("master.x"), dir.path().join("master.x")).unwrap();
    std::fs::copy(
        src.join("tests/rpcgen_client.c"),
        dir.path().join("client.c"),
    )
    .unwrap();
    let st = Command::new("rpcgen")
        .args(["-N", "master.x"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "rpcgen failed on master.x");
    let out = Command::new("gcc")
        .args([
            "-Wall",
            "-Werror",
            "-Wno-unused-variable",
            "-I/usr/include/tirpc",
            "-o",
            "client",
        ])
        .args(["client.c", "master_clnt.c", "master_xdr.c", "-ltirpc"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (store, state) = Store::open(&dir.path().join("state"), Some(1 << 30)).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let m = Master::new(store, state, slog::Logger::root(slog::Discard, slog::o!()));
    std::thread::spawn(move || m.serve(l));

    let out = Command::new(dir.path().join("client"))
        .args(["127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "C client failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("registered 10.7.0.1:3260: 2 new"), "{text}");
    assert_eq!(text.matches("index ").count(), 4, "{text}");
    assert!(
        text.contains("list: 4 extents of 1073741824 bytes, 4 allocated"),
        "{text}"
    );
    // The two replicas of index 0 are on different servers.
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("index 0")).collect();
    assert_eq!(lines.len(), 2);
    assert_ne!(
        lines[0].split(' ').nth(5),
        lines[1].split(' ').nth(5),
        "{text}"
    );
}
