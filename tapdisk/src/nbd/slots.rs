//! Who holds an export's connection slots, who waits for one, and who gives one up.
//!
//! An export serves at most [`MAX_CONNECTIONS`] clients at once; clients that arrive while
//! every slot is taken wait in line, first come first served ([`MAX_WAITING`] of them; later
//! ones are closed at once), without a greeting until they have a slot. Each connection's
//! thread reports its progress ([`Progress`]: still in the handshake, or the last time its
//! client was active in transmission), and the server keeps three rules with it:
//!
//! - **Handshake deadline.** A client must reach transmission within [`HANDSHAKE_DEADLINE`] of
//!   getting its slot: the whole phase, however it spends it (saying nothing, trickling bytes,
//!   looping on options, not reading the replies). The accept thread checks at least every
//!   [`CHECK_EVERY`] and hangs up on those that are late.
//! - **Making room.** While a client waits, the slot of the client that has been in its
//!   handshake longest is given to it, if that is more than [`HANDSHAKE_GRACE`]; else that of
//!   the client idle longest in transmission (no request taken and none answered), if that is
//!   more than [`IDLE_EVICT`]. Clients that use their connection keep it; idle ones are left
//!   alone while nobody waits (an NBD client may be idle for hours).
//! - **Waiting deadline.** A client that has waited [`WAIT_DEADLINE`] (every slot held by
//!   clients that use them) is closed; it may come back.
//!
//! So however many clients misbehave, as long as each holds one connection, a client that
//! arrives is served within [`IDLE_EVICT`] (plus [`CHECK_EVERY`]), and within
//! [`HANDSHAKE_GRACE`] when the slots are held by clients stalled in their handshake: those
//! that were cut off and come back queue behind it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::MAX_CONNECTIONS;

/// How long a client may take from being accepted to reaching transmission.
pub const HANDSHAKE_DEADLINE: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_secs(10)
};

/// A client in its handshake for longer than this gives its slot to a newcomer when every
/// slot is taken (a well-behaved client takes a few round trips).
pub const HANDSHAKE_GRACE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(1)
};

/// A client idle in transmission for longer than this gives its slot to a newcomer when every
/// slot is taken. Idle clients are otherwise left alone: an NBD client may be idle for hours.
pub const IDLE_EVICT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(10)
};

/// How often, at least, the accept thread looks for clients past the handshake deadline, and
/// for slots a waiting client may have.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Clients that may wait for a slot; more are closed at once.
pub const MAX_WAITING: usize = 64;

/// How long a client may wait for a slot before it is closed.
pub const WAIT_DEADLINE: Duration = if cfg!(test) {
    Duration::from_secs(3)
} else {
    Duration::from_secs(30)
};

/// Why the server hung up on a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// It did not reach transmission within [`HANDSHAKE_DEADLINE`].
    HandshakeDeadline,
    /// Its slot went to a newcomer (a full export).
    MadeRoom,
}

/// One connection's progress, written by its thread, read by the server.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last activity in transmission, plus one; 0 while
    /// the client is in its handshake.
    active: AtomicU64,
    /// 0, or 1 + the [`Cut`] the server hung up for.
    cut: AtomicU8,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A connection given its slot now, in its handshake.
    pub fn new() -> Progress {
        Progress::since(Instant::now())
    }

    /// A connection given its slot at `t`, in its handshake.
    fn since(t: Instant) -> Progress {
        Progress {
            epoch: t,
            active: AtomicU64::new(0),
            cut: AtomicU8::new(0),
        }
    }

    /// The client reached transmission, or was active in it (took a request, got a reply).
    #[inline]
    pub fn active(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.active.store(ms, Ordering::Relaxed);
    }

    /// Why the server hung up, if it did.
    pub fn cut(&self) -> Option<Cut> {
        match self.cut.load(Ordering::Acquire) {
            1 => Some(Cut::HandshakeDeadline),
            2 => Some(Cut::MadeRoom),
            _ => None,
        }
    }

    fn set_cut(&self, why: Cut) {
        let v = match why {
            Cut::HandshakeDeadline => 1,
            Cut::MadeRoom => 2,
        };
        self.cut.store(v, Ordering::Release);
    }

    /// `Err(time in the handshake)`, or `Ok(time idle in transmission)`, at `now`.
    fn state(&self, now: Instant) -> Result<Duration, Duration> {
        let since = now.saturating_duration_since(self.epoch);
        match self.active.load(Ordering::Relaxed) {
            0 => Err(since),
            ms => Ok(since.saturating_sub(Duration::from_millis(ms - 1))),
        }
    }
}

/// A client connection, as the slots see it.
pub trait Conn: Sized {
    /// Shuts the connection down: the connection's thread sees its reads and writes end.
    fn hang_up(&self);
    /// Whether the client has left (an end of file is waiting) while it waited for a slot.
    fn gone(&self) -> bool;
    /// A second handle on the connection, to hang up on it while its thread serves it.
    fn handle(&self) -> std::io::Result<Self>;
}

struct Slot<S> {
    conn: S,
    progress: Arc<Progress>,
}

/// The slots of one export, and the clients waiting for one.
pub struct Slots<S> {
    next_id: u64,
    live: HashMap<u64, Slot<S>>,
    waiting: VecDeque<(S, Instant)>,
}

impl<S> Default for Slots<S> {
    fn default() -> Self {
        Slots {
            next_id: 0,
            live: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }
}

/// A client given a slot.
pub struct Admitted<S> {
    /// The connection's number.
    pub id: u64,
    /// The connection (the slot holds a second handle on it).
    pub conn: S,
    /// Where its thread reports its progress.
    pub progress: Arc<Progress>,
    /// The client whose slot it took, if it took one.
    pub took_from: Option<u64>,
    /// How long it waited.
    pub waited: Duration,
}

impl<S: Conn> Slots<S> {
    /// Clients holding a slot.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no client holds a slot.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Clients waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A client arrived: it waits in line for a slot (see [`Slots::admit`]), unless
    /// [`MAX_WAITING`] clients wait already (`Err`: close it).
    pub fn arrive(&mut self, conn: S, now: Instant) -> Result<(), S> {
        if self.waiting.len() >= MAX_WAITING {
            return Err(conn);
        }
        self.waiting.push_back((conn, now));
        Ok(())
    }

    /// The next waiting client that can have a slot now: a free one, or one a client must
    /// give up (see the module documentation). Clients that left while waiting, or waited
    /// longer than [`WAIT_DEADLINE`], are dropped (closed) on the way.
    pub fn admit(&mut self, now: Instant) -> Option<Admitted<S>> {
        loop {
            let (conn, since) = self.waiting.front()?;
            let waited = now.saturating_duration_since(*since);
            if conn.gone() || waited >= WAIT_DEADLINE {
                self.waiting.pop_front();
                continue;
            }
            let mut took_from = None;
            if self.live.len() >= MAX_CONNECTIONS {
                let id = self.victim(now)?;
                self.cut(id, Cut::MadeRoom);
                took_from = Some(id);
            }
            let (conn, _) = self.waiting.pop_front()?;
            let Ok(handle) = conn.handle() else {
                continue;
            };
            let progress = Arc::new(Progress::since(now));
            let id = self.next_id;
            self.next_id += 1;
            self.live.insert(
                id,
                Slot {
                    conn: handle,
                    progress: progress.clone(),
                },
            );
            return Some(Admitted {
                id,
                conn,
                progress,
                took_from,
                waited,
            });
        }
    }

    /// Frees slot `id` (its connection ended).
    pub fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }

    /// Hangs up on every client past the handshake deadline; returns how many.
    pub fn enforce_deadline(&mut self, now: Instant) -> usize {
        let late: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, s)| {
                s.progress
                    .state(now)
                    .is_err_and(|t| t >= HANDSHAKE_DEADLINE)
            })
            .map(|(&id, _)| id)
            .collect();
        for &id in &late {
            self.cut(id, Cut::HandshakeDeadline);
        }
        late.len()
    }

    /// Hangs up on every client and closes every waiting one (the server stops); returns how
    /// many were served.
    pub fn hang_up_all(&mut self) -> usize {
        self.waiting.clear();
        for s in self.live.values() {
            s.conn.hang_up();
        }
        self.live.len()
    }

    fn cut(&mut self, id: u64, why: Cut) {
        if let Some(s) = self.live.remove(&id) {
            s.progress.set_cut(why);
            s.conn.hang_up();
        }
    }

    /// Whose slot a waiting client takes: the client longest in its handshake past the
    /// grace, else the one longest idle in transmission past [`IDLE_EVICT`].
    fn victim(&self, now: Instant) -> Option<u64> {
        let mut handshaking: Option<(u64, Duration)> = None;
        let mut idle: Option<(u64, Duration)> = None;
        for (&id, s) in &self.live {
            match s.progress.state(now) {
                Err(t) if t >= HANDSHAKE_GRACE && handshaking.is_none_or(|(_, u)| t > u) => {
                    handshaking = Some((id, t))
                }
                Ok(t) if t >= IDLE_EVICT && idle.is_none_or(|(_, u)| t > u) => idle = Some((id, t)),
                _ => {}
            }
        }
        handshaking.or(idle).map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Default, Clone)]
    struct Fake {
        hung_up: Arc<AtomicBool>,
        gone: Arc<AtomicBool>,
    }
    impl Conn for Fake {
        fn hang_up(&self) {
            self.hung_up.store(true, Ordering::Relaxed);
        }
        fn gone(&self) -> bool {
            self.gone.load(Ordering::Relaxed)
        }
        fn handle(&self) -> std::io::Result<Fake> {
            Ok(self.clone())
        }
    }
    impl Fake {
        fn hung(&self) -> bool {
            self.hung_up.load(Ordering::Relaxed)
        }
    }

    /// Admits `f` at `now` and backdates its progress: accepted at `accepted`, active last
    /// at `active` (None: still in the handshake).
    fn fill(
        s: &mut Slots<Fake>,
        f: &Fake,
        now: Instant,
        accepted: Instant,
        active: Option<Instant>,
    ) {
        s.arrive(f.clone(), now).ok().unwrap();
        let a = s.admit(now).unwrap();
        s.live.get_mut(&a.id).unwrap().progress = Arc::new(Progress {
            epoch: accepted,
            active: AtomicU64::new(active.map_or(0, |t| (t - accepted).as_millis() as u64 + 1)),
            cut: AtomicU8::new(0),
        });
    }

    /// Full slots: a waiting client takes the slot of the client longest in its handshake
    /// (past the grace), else of the one idle longest (past IDLE_EVICT), else it waits, in
    /// line, until its deadline.
    #[test]
    fn a_waiting_client_takes_the_slot_a_client_may_lose() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let mut s: Slots<Fake> = Slots::default();
        let busy: Vec<Fake> = (0..MAX_CONNECTIONS - 2).map(|_| Fake::default()).collect();
        for f in &busy {
            fill(&mut s, f, now, t0, Some(now));
        }
        let (idle, young) = (Fake::default(), Fake::default());
        fill(&mut s, &idle, now, t0, Some(t0 + Duration::from_secs(50)));
        fill(&mut s, &young, now, now - HANDSHAKE_GRACE / 2, None);
        assert_eq!(s.len(), MAX_CONNECTIONS);
        let (a, b, c) = (Fake::default(), Fake::default(), Fake::default());
        for f in [&a, &b, &c] {
            s.arrive(f.clone(), now).ok().unwrap();
        }
        // The idle one goes first (the young handshake is within its grace).
        let got = s.admit(now).unwrap();
        assert!(got.took_from.is_some() && idle.hung() && !young.hung());
        // Then nobody may lose a slot: b and c wait.
        assert!(s.admit(now).is_none());
        assert_eq!(s.waiting(), 2);
        // Once the young one is past its grace, it goes, to b (first in line).
        let later = now + HANDSHAKE_GRACE;
        let got = s.admit(later).unwrap();
        assert!(young.hung() && got.took_from.is_some());
        got.conn.hang_up();
        assert!(b.hung() && !c.hung());
        assert!(busy.iter().all(|f| !f.hung()));
        // A client waits until its deadline while every slot is used, then it is dropped; a
        // client that left while waiting is dropped too.
        let t1 = now + WAIT_DEADLINE;
        let mut s: Slots<Fake> = Slots::default();
        for _ in 0..MAX_CONNECTIONS {
            fill(&mut s, &Fake::default(), now, t0, Some(t1));
        }
        s.arrive(c.clone(), now).ok().unwrap();
        assert!(s.admit(t1 - Duration::from_millis(1)).is_none());
        assert_eq!(s.waiting(), 1);
        assert!(s.admit(t1).is_none());
        assert_eq!(s.waiting(), 0);
        let gone = Fake::default();
        gone.gone.store(true, Ordering::Relaxed);
        s.arrive(gone, t1).ok().unwrap();
        s.remove(0);
        assert!(s.admit(t1).is_none() && s.waiting() == 0);
        // The line is bounded.
        for _ in 0..MAX_WAITING {
            s.arrive(Fake::default(), later).ok().unwrap();
        }
        assert!(s.arrive(Fake::default(), later).is_err());
    }

    /// The handshake deadline is for the whole phase: a client given its slot longer ago than
    /// the deadline and not in transmission is hung up on; clients in transmission never are.
    #[test]
    fn the_handshake_deadline_counts_from_the_slot() {
        let t0 = Instant::now();
        let mut s: Slots<Fake> = Slots::default();
        let (late, idle) = (Fake::default(), Fake::default());
        fill(&mut s, &late, t0, t0, None);
        fill(&mut s, &idle, t0, t0, Some(t0));
        assert_eq!(s.enforce_deadline(t0 + HANDSHAKE_DEADLINE / 2), 0);
        assert_eq!(s.enforce_deadline(t0 + HANDSHAKE_DEADLINE), 1);
        assert!(late.hung() && !idle.hung());
        assert_eq!(s.enforce_deadline(t0 + HANDSHAKE_DEADLINE * 100), 0);
        assert_eq!(s.len(), 1);
    }
}
