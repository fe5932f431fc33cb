//! SCSI-3 persistent reservations against a real Debian `tgtd` (which implements REGISTER,
//! RESERVE, PREEMPT, CLEAR and the READ KEYS / READ RESERVATION reports): the fencing the
//! `stripe:` driver builds on. A writer holds "write exclusive, registrants only"; a newcomer
//! that preempts its key leaves its writes ending in RESERVATION CONFLICT, and a session with a
//! [`Registration`] is registered again after every login, so it keeps writing across a
//! target restart while an unregistered one does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use iscsi::lab::{Tgtd, TgtdOptions};
use iscsi::scsi::{PrOut, PrType, STATUS_RESERVATION_CONFLICT};
use iscsi::{Client, Error, IoError, Registration};

const WERO: Option<PrType> = Some(PrType::WriteExclusiveRegistrantsOnly);

fn tgtd() -> Tgtd {
    assert!(
        Tgtd::available(),
        "tgtd is not installed: apt-get install tgt (CI installs it)"
    );
    Tgtd::start(TgtdOptions::default()).expect("starting tgtd")
}

fn conflict(r: Result<(), Error>) -> bool {
    matches!(
        r,
        Err(Error::Command(IoError::Status(STATUS_RESERVATION_CONFLICT)))
    )
}

#[test]
fn a_preempted_writer_is_refused_and_readers_are_not() {
    let t = tgtd();
    let mut a = Client::connect(&t.config(), 1).unwrap();
    let mut b = Client::connect(&t.config(), 1).unwrap();
    let data = vec![0xa5u8; 4096];
    // A registers its key and reserves; B, not registered, may read but not write.
    a.pr_out(PrOut::Register, None, 0, 0x1111).unwrap();
    a.pr_out(PrOut::Reserve, WERO, 0x1111, 0).unwrap();
    a.write16(0, &data, 512, false).unwrap();
    assert!(conflict(b.write16(0, &data, 512, false)));
    let mut back = vec![0u8; 4096];
    b.read16(0, &mut back, 512).unwrap();
    assert_eq!(back, data);
    let r = b.pr_read_reservation().unwrap();
    assert_eq!(r.holder, Some((0x1111, 5)));
    assert_eq!(b.pr_read_keys().unwrap().keys, vec![0x1111]);
    // B registers a newer key and preempts A's: B holds the reservation, A is gone.
    b.pr_out(PrOut::Register, None, 0, 0x2222).unwrap();
    b.pr_out(PrOut::Preempt, WERO, 0x2222, 0x1111).unwrap();
    assert_eq!(a.pr_read_keys().unwrap().keys, vec![0x2222]);
    assert_eq!(a.pr_read_reservation().unwrap().holder, Some((0x2222, 5)));
    let late = vec![0x5au8; 4096];
    assert!(
        conflict(a.write16(8, &late, 512, false)),
        "a preempted writer wrote"
    );
    assert!(conflict(a.synchronize_cache16().map(|_| ())));
    // A cannot preempt back with its old key: it is no longer registered.
    assert!(conflict(a.pr_out(PrOut::Preempt, WERO, 0x1111, 0x2222)));
    b.write16(8, &data, 512, true).unwrap();
    b.read16(8, &mut back, 512).unwrap();
    assert_eq!(back, data);
    // CLEAR by the holder removes everything; anyone writes again.
    b.pr_out(PrOut::Clear, None, 0x2222, 0).unwrap();
    assert!(b.pr_read_keys().unwrap().keys.is_empty());
    assert_eq!(b.pr_read_reservation().unwrap().holder, None);
    a.write16(16, &data, 512, false).unwrap();
}

#[test]
fn a_registration_is_taken_at_every_login_and_the_newer_key_wins() {
    let mut t = tgtd();
    let mut cfg = t.config();
    cfg.reconnect_timeout = Duration::from_secs(10);
    cfg.login_timeout = Duration::from_secs(2);
    let with_key = |k: &Arc<AtomicU64>| {
        let mut c = cfg.clone();
        c.registration = Some(Registration {
            key: k.clone(),
            luns: vec![1],
        });
        c
    };
    let old = Arc::new(AtomicU64::new(0x3333));
    // The writer's session registers and reserves at login; a session without a registration
    // may read but not write.
    let mut w = Client::connect(&with_key(&old), 1).unwrap();
    let mut plain = Client::connect(&cfg, 1).unwrap();
    let data = vec![0x77u8; 4096];
    let mut back = vec![0u8; 512];
    w.write16(0, &data, 512, false).unwrap();
    assert!(conflict(plain.write16(0, &data, 512, false)));
    assert_eq!(
        plain.pr_read_reservation().unwrap().holder,
        Some((0x3333, 5))
    );
    // The target restarts and forgets everything; the writer's reconnect takes the
    // reservation again, so its write goes through and the other's still does not.
    t.kill();
    t.spawn().unwrap();
    w.write16(8, &data, 512, false).unwrap();
    assert!(w.session().reconnects() >= 1);
    plain.read16(0, &mut back, 512).unwrap();
    assert!(conflict(plain.write16(8, &data, 512, false)));
    // A newer writer (higher key) preempts at its login: the old one's writes are refused.
    let new = Arc::new(AtomicU64::new(0x4444));
    let mut n = Client::connect(&with_key(&new), 1).unwrap();
    assert!(
        conflict(w.write16(16, &data, 512, false)),
        "the old writer wrote"
    );
    n.write16(16, &data, 512, false).unwrap();
    assert_eq!(n.pr_read_keys().unwrap().keys, vec![0x4444]);
    // An older key logging in now is told it is fenced.
    match Client::connect(&with_key(&Arc::new(AtomicU64::new(0x3333))), 1) {
        Err(Error::Fenced { newer, .. }) => assert_eq!(newer, 0x4444),
        Err(e) => panic!("expected Fenced, got {e}"),
        Ok(_) => panic!("an older key logged in"),
    }
    // The old writer knows it lost (its key is withdrawn): after another restart its
    // reconnect registers nothing, and the newer writer's reconnect reserves again.
    old.store(0, Ordering::SeqCst);
    t.kill();
    t.spawn().unwrap();
    n.write16(24, &data, 512, false).unwrap();
    w.read16(0, &mut back, 512).unwrap();
    assert!(conflict(w.write16(24, &data, 512, false)));
    assert_eq!(n.pr_read_keys().unwrap().keys, vec![0x4444]);
}
