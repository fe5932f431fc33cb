//! Adaptive polling: how long a ring loop spins before it sleeps.
//!
//! Sleeping costs a wake-up per request at low depth: the frontend's kick, the scheduler
//! switching us in, and on the way back the frontend's own wake-up. Spinning instead costs a
//! core. A fixed window is right for one arrival rate and wrong for the others (xapi's
//! tapdisk gained a polling mode for this reason: 40 % faster on a database workload with
//! the right window, slower with the wrong one), so the window here follows what the loop
//! sees, between 0 and the configured maximum (`--poll-us`):
//!
//! - a spin that finds work after `t` keeps the window at least `2t` (the next gap is
//!   probably alike);
//! - a spin that finds nothing halves the window; below [`MIN_WINDOW_NS`] it closes, and the
//!   loop sleeps at once from then on;
//! - while the window is closed, a sleep that ended within half the maximum (work came soon
//!   after we went to sleep) opens it to twice that sleep: polling would have caught it.
//!   A poller can ask for several such sleeps in a row before it reopens, and every time a
//!   window closes without a hit since it opened, it asks for twice as many (up to
//!   [`MAX_REOPEN_AFTER`]); a hit brings that back down. Spins that never hit are what a loop
//!   sees when the frontend shares its core (two busy threads, one core: the request cannot
//!   come while we spin), and there the backoff makes polling all but stop.
//!
//! The loop keeps two: one for requests (nothing in flight: the frontend's next request is
//! what comes), reopened by one short sleep, and one for completions (IO in flight), reopened
//! only by a run of short sleeps. Spinning on a device's completions competes with the
//! kernel's own completion work for the cores (interrupt threads, workqueues), and on a busy
//! small machine it can make the IO itself slower than the wake-up it saves; a miss closes the
//! window quickly, and it stays closed until completions keep coming back fast.
//!
//! An idle disk therefore costs a few halving windows after its last request and nothing
//! after that; a disk whose requests come further apart than the maximum never polls for
//! long. This module is the policy only; the loop does the spinning ([`super::RingLoop`]) and
//! reports what happened here. Counters go to [`crate::stats::poll::PollCounters`].

/// Below this the window closes: a spin this short rarely catches anything.
pub const MIN_WINDOW_NS: u64 = 1_000;

/// The most short sleeps in a row a closed window can ask for.
pub const MAX_REOPEN_AFTER: u32 = 64;

/// How a spin ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollEnd {
    /// Work arrived (a request or a completion) after this many ns.
    Hit(u64),
    /// The window passed with nothing to do.
    Miss,
    /// Something else needs the loop (stop, pause): neither a hit nor a miss.
    Interrupted,
}

/// The polling window of one ring loop.
#[derive(Clone, Copy, Debug)]
pub struct Poller {
    /// The configured maximum, ns (0: never poll).
    max_ns: u64,
    /// The window now, ns (0: closed).
    window_ns: u64,
    /// Short sleeps in a row a closed window needs to reopen, when spins hit.
    base_reopen: u32,
    /// Short sleeps in a row needed to reopen a closed window now.
    reopen_after: u32,
    /// A spin hit since the window last opened.
    hit_since_open: bool,
    /// Short sleeps in a row so far.
    short_sleeps: u32,
}

impl Poller {
    /// A poller of at most `max_ns`, starting open, reopened by `reopen_after` short sleeps
    /// in a row (at least 1).
    pub fn new(max_ns: u64, reopen_after: u32) -> Poller {
        Poller {
            max_ns,
            window_ns: if max_ns >= MIN_WINDOW_NS { max_ns } else { 0 },
            base_reopen: reopen_after.max(1),
            reopen_after: reopen_after.max(1),
            hit_since_open: false,
            short_sleeps: 0,
        }
    }

    /// How long to spin now (0: sleep at once).
    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    /// Whether polling is configured at all.
    pub fn enabled(&self) -> bool {
        self.max_ns >= MIN_WINDOW_NS
    }

    /// Learns from a spin.
    pub fn spun(&mut self, end: PollEnd) {
        if !self.enabled() {
            return;
        }
        match end {
            PollEnd::Hit(t) => {
                self.hit_since_open = true;
                self.reopen_after = self.base_reopen;
                self.window_ns = self
                    .window_ns
                    .max(t.saturating_mul(2))
                    .clamp(MIN_WINDOW_NS, self.max_ns);
            }
            PollEnd::Miss if self.window_ns == 0 => {}
            PollEnd::Miss => {
                self.window_ns /= 2;
                if self.window_ns < MIN_WINDOW_NS {
                    self.window_ns = 0;
                    if !self.hit_since_open {
                        self.reopen_after = (self.reopen_after * 2).min(MAX_REOPEN_AFTER);
                    }
                }
            }
            PollEnd::Interrupted => {}
        }
    }

    /// Learns from a sleep that lasted `slept_ns` before work arrived. Only a closed window
    /// learns from sleeps: after a miss, what came soon after we slept says little (it may
    /// have been held off by our own spinning), so an open window widens on hits only.
    pub fn slept(&mut self, slept_ns: u64) {
        if !self.enabled() || self.window_ns > 0 {
            return;
        }
        if slept_ns > self.max_ns / 2 {
            self.short_sleeps = 0;
            return;
        }
        self.short_sleeps += 1;
        if self.short_sleeps < self.reopen_after {
            return;
        }
        self.short_sleeps = 0;
        self.hit_since_open = false;
        self.window_ns = slept_ns.saturating_mul(2).clamp(MIN_WINDOW_NS, self.max_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_stays_off() {
        let mut p = Poller::new(0, 1);
        p.slept(10);
        p.spun(PollEnd::Hit(10));
        assert!(!p.enabled());
        assert_eq!(p.window_ns(), 0);
    }

    #[test]
    fn an_idle_disk_stops_polling_after_a_few_misses() {
        let mut p = Poller::new(50_000, 1);
        let mut spent = 0;
        // Requests a second apart: every spin misses, every sleep is long.
        for _ in 0..20 {
            spent += p.window_ns();
            if p.window_ns() > 0 {
                p.spun(PollEnd::Miss);
            }
            p.slept(1_000_000_000);
        }
        assert_eq!(p.window_ns(), 0);
        assert!(spent < 100_000, "spun {spent} ns in all");
    }

    #[test]
    fn close_arrivals_open_the_window_and_keep_it_open() {
        let mut p = Poller::new(50_000, 1);
        for _ in 0..10 {
            p.spun(PollEnd::Miss);
        }
        assert_eq!(p.window_ns(), 0);
        // Requests 8 µs after we went to sleep: polling would have caught them (two in a
        // row: the first window closed without a hit).
        p.slept(8_000);
        assert_eq!(p.window_ns(), 0);
        p.slept(8_000);
        assert_eq!(p.window_ns(), 16_000);
        // Hits at 8 µs keep it there; a longer gap widens it, never past the maximum.
        p.spun(PollEnd::Hit(8_000));
        assert_eq!(p.window_ns(), 16_000);
        p.spun(PollEnd::Hit(40_000));
        assert_eq!(p.window_ns(), 50_000);
        // An open window learns nothing from sleeps.
        p.spun(PollEnd::Miss);
        p.slept(1_000);
        assert_eq!(p.window_ns(), 25_000);
        p.spun(PollEnd::Interrupted);
        assert_eq!(p.window_ns(), 25_000);
    }

    #[test]
    fn spins_that_never_hit_back_off() {
        // The frontend shares our core: nothing comes while we spin, and it comes 2 µs after
        // we sleep. Each closing asks for twice the short sleeps to reopen.
        let mut p = Poller::new(50_000, 1);
        let (mut spun, rounds) = (0u64, 10_000);
        for _ in 0..rounds {
            let w = p.window_ns();
            if w > 0 {
                spun += w;
                p.spun(PollEnd::Miss);
            }
            p.slept(2_000);
        }
        assert!(spun < rounds * 200, "spun {spun} ns over {rounds} requests");
        // Hits bring the reopening back to one short sleep.
        while p.window_ns() == 0 {
            p.slept(2_000);
        }
        p.spun(PollEnd::Hit(1_000));
        for _ in 0..3 {
            p.spun(PollEnd::Miss);
        }
        assert_eq!(p.window_ns(), 0);
        p.slept(2_000);
        assert_eq!(p.window_ns(), 4_000);
    }

    #[test]
    fn a_closed_window_can_ask_for_a_run_of_short_sleeps() {
        let mut p = Poller::new(50_000, 3);
        p.spun(PollEnd::Hit(1_000));
        for _ in 0..10 {
            p.spun(PollEnd::Miss);
        }
        p.slept(5_000);
        p.slept(5_000);
        assert_eq!(p.window_ns(), 0);
        p.slept(40_000); // long: the run starts over
        p.slept(5_000);
        p.slept(5_000);
        assert_eq!(p.window_ns(), 0);
        p.slept(6_000);
        assert_eq!(p.window_ns(), 12_000);
    }
}
