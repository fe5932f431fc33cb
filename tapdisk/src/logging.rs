//! Logging: slog to stderr or a file, and a rate limiter for messages a guest can provoke.

use std::time::{Duration, Instant};

use slog::{o, Drain, Logger};

/// A logger writing to stderr (or the file `path`), at `level` and above.
pub fn logger(path: Option<&std::path::Path>, level: slog::Level) -> std::io::Result<Logger> {
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match path {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            let d = slog_term::FullFormat::new(slog_term::PlainSyncDecorator::new(f)).build();
            Box::new(d.filter_level(level).fuse())
        }
        None => {
            let d =
                slog_term::FullFormat::new(slog_term::PlainSyncDecorator::new(std::io::stderr()))
                    .build();
            Box::new(d.filter_level(level).fuse())
        }
    };
    Ok(Logger::root(std::sync::Mutex::new(drain).fuse(), o!()))
}

/// Lets through at most `burst` messages per `period`, then counts what it held back so the
/// next message that passes can say how many were suppressed. A guest that floods us with bad
/// requests costs a counter increment, not a log line each.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` messages per `period`.
    pub fn new(burst: u32, period: Duration) -> RateLimit {
        RateLimit {
            burst,
            period,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now; `Some(n)` with `n` messages suppressed since the last one logged.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= self.period {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_suppresses_and_reports() {
        let mut r = RateLimit::new(2, Duration::from_millis(50));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.check(), Some(2));
    }
}
