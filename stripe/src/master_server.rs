//! The master's RPC server ([`Master`]) over a state [`Backend`]: the single-host
//! [`FileBackend`] (the state folder of [`crate::master::Store`]), or one shared by several
//! masters (etcd, crate `stripe-etcd`).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::master::{State, Store};
use crate::proto::{self, AllocArgs, Failure, ListRes, RegisterArgs, Status};
use crate::rpc::{self, ReplyStatus};
use crate::xdr::{Dec, Enc};

/// Largest call record the master reads.
const MAX_CALL: usize = 64 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// Where a master keeps its state: it applies a change to the current state and stores the
/// result before the change counts. The change may be run more than once (a store shared by
/// several masters retries when another changed the state first); only the run that was
/// stored counts.
pub trait Backend: Send + Sync {
    /// Runs `f` on the current state and stores what it made (nothing if `f` fails).
    fn apply(&self, f: &mut dyn FnMut(&mut State) -> Result<(), Failure>) -> Result<(), Failure>;

    /// The current state's extents and owners.
    fn list(&self) -> Result<ListRes, Failure>;
}

/// The single-host backend: the state in memory behind a mutex (calls are rare and short),
/// stored in the state folder when there is one.
pub struct FileBackend {
    inner: Mutex<(Option<Store>, State)>,
    log: slog::Logger,
}

impl Backend for FileBackend {
    fn apply(&self, f: &mut dyn FnMut(&mut State) -> Result<(), Failure>) -> Result<(), Failure> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = g.1.clone();
        f(&mut next)?;
        if let Some(store) = &g.0 {
            if let Err(e) = store.save(&next) {
                slog::error!(self.log, "storing state failed"; "error" => %e);
                return Err(Failure::new(Status::Storage, e.to_string()));
            }
        }
        g.1 = next;
        Ok(())
    }

    fn list(&self) -> Result<ListRes, Failure> {
        Ok(self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .list())
    }
}

/// A running master: the RPC program over a [`Backend`].
pub struct Master {
    backend: Box<dyn Backend>,
    log: slog::Logger,
}

impl Master {
    /// A master over an opened store.
    pub fn new(store: Store, state: State, log: slog::Logger) -> Arc<Master> {
        let backend = FileBackend {
            inner: Mutex::new((Some(store), state)),
            log: log.clone(),
        };
        Arc::new(Master {
            backend: Box::new(backend),
            log,
        })
    }

    /// A master over another backend (etcd: crate `stripe-etcd`).
    pub fn with_backend(backend: Box<dyn Backend>, log: slog::Logger) -> Arc<Master> {
        Arc::new(Master { backend, log })
    }

    /// A master that keeps its state in memory only (tests and fuzzing).
    pub fn in_memory(state: State) -> Master {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        Master {
            backend: Box::new(FileBackend {
                inner: Mutex::new((None, state)),
                log: log.clone(),
            }),
            log,
        }
    }

    /// Applies a change through the backend.
    fn change<T>(&self, mut f: impl FnMut(&mut State) -> Result<T, Failure>) -> Result<T, Failure> {
        let mut out = None;
        self.backend.apply(&mut |s| {
            out = Some(f(s)?);
            Ok(())
        })?;
        out.ok_or_else(|| Failure::new(Status::Storage, "the change was never run"))
    }

    /// Executes one call record; returns the reply record, or None for a record too broken
    /// to answer (no xid).
    pub fn handle(&self, call: &[u8]) -> Option<Vec<u8>> {
        let mut d = Dec::new(call);
        let h = match rpc::decode_call(&mut d) {
            Ok(h) => h,
            Err(_) => {
                // Answer GARBAGE_ARGS if at least the xid is there.
                let xid = Dec::new(call).u32().ok()?;
                let mut e = Enc::new();
                rpc::encode_reply(&mut e, xid, ReplyStatus::GarbageArgs);
                return Some(e.into_bytes());
            }
        };
        let mut e = Enc::new();
        if h.rpcvers != rpc::RPC_VERSION {
            rpc::encode_reply(&mut e, h.xid, ReplyStatus::RpcMismatch(2, 2));
            return Some(e.into_bytes());
        }
        if h.prog != proto::PROG {
            rpc::encode_reply(&mut e, h.xid, ReplyStatus::ProgUnavail);
            return Some(e.into_bytes());
        }
        if h.vers != proto::VERS {
            rpc::encode_reply(
                &mut e,
                h.xid,
                ReplyStatus::ProgMismatch(proto::VERS, proto::VERS),
            );
            return Some(e.into_bytes());
        }
        let garbage = |xid| {
            let mut e = Enc::new();
            rpc::encode_reply(&mut e, xid, ReplyStatus::GarbageArgs);
            Some(e.into_bytes())
        };
        match h.proc_ {
            proto::PROC_NULL => {
                if d.finish().is_err() {
                    return garbage(h.xid);
                }
                rpc::encode_reply(&mut e, h.xid, ReplyStatus::Success);
            }
            proto::PROC_REGISTER => {
                let Ok(a) = RegisterArgs::decode(&mut d).and_then(|a| d.finish().map(|_| a)) else {
                    return garbage(h.xid);
                };
                let r = self.change(|s| s.register(&a));
                slog::info!(self.log, "register"; "portal" => &a.portal, "target" => &a.target,
                    "lun" => a.lun, "start" => a.start, "count" => a.count,
                    "result" => format!("{r:?}"));
                rpc::encode_reply(&mut e, h.xid, ReplyStatus::Success);
                proto::encode_register_res(&mut e, &r);
            }
            proto::PROC_ALLOCATE => {
                let Ok(a) = AllocArgs::decode(&mut d).and_then(|a| d.finish().map(|_| a)) else {
                    return garbage(h.xid);
                };
                let r = self.change(|s| s.allocate(&a));
                slog::info!(self.log, "allocate"; "disk" => &a.disk, "first" => a.first,
                    "count" => a.count, "replicas" => a.replicas,
                    "result" => match &r { Ok(p) => format!("{} placements", p.len()), Err(f) => f.to_string() });
                rpc::encode_reply(&mut e, h.xid, ReplyStatus::Success);
                proto::encode_alloc_res(&mut e, &r);
            }
            proto::PROC_RELEASE => {
                let Ok(disk) = d
                    .string(proto::MAX_NAME, "disk id")
                    .and_then(|s| d.finish().map(|_| s))
                else {
                    return garbage(h.xid);
                };
                let r = self.change(|s| s.release(&disk));
                slog::info!(self.log, "release"; "disk" => &disk, "result" => format!("{r:?}"));
                rpc::encode_reply(&mut e, h.xid, ReplyStatus::Success);
                proto::encode_release_res(&mut e, &r);
            }
            proto::PROC_LIST => {
                if d.finish().is_err() {
                    return garbage(h.xid);
                }
                let l = match self.backend.list() {
                    Ok(l) => l,
                    Err(f) => {
                        slog::error!(self.log, "cannot read the state"; "error" => %f);
                        rpc::encode_reply(&mut e, h.xid, ReplyStatus::SystemErr);
                        return Some(e.into_bytes());
                    }
                };
                rpc::encode_reply(&mut e, h.xid, ReplyStatus::Success);
                proto::encode_list_res(&mut e, &l);
            }
            _ => rpc::encode_reply(&mut e, h.xid, ReplyStatus::ProcUnavail),
        }
        Some(e.into_bytes())
    }

    /// Serves one connection until the peer closes it or sends something unreadable.
    pub fn serve_conn(&self, mut s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
        let _ = s.set_nodelay(true);
        loop {
            let rec = match rpc::read_record(&mut s, MAX_CALL) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    slog::debug!(self.log, "connection dropped"; "error" => %e);
                    return;
                }
            };
            let Some(reply) = self.handle(&rec) else {
                return;
            };
            if rpc::write_record(&mut s, &reply).is_err() {
                return;
            }
        }
    }

    /// Accepts connections forever, one thread each (at most [`MAX_CONNECTIONS`] at once).
    pub fn serve(self: &Arc<Master>, l: TcpListener) -> io::Result<()> {
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            let (s, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if live.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
                slog::warn!(self.log, "too many connections; refusing one"; "peer" => %peer);
                continue;
            }
            live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let m = Arc::clone(self);
            let live = Arc::clone(&live);
            std::thread::spawn(move || {
                m.serve_conn(s);
                live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    }
}
