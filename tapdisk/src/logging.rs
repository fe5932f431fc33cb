//! Logging: slog to stderr or a file, degrading (never panicking) when the log cannot be
//! written, and a rate limiter for messages a guest can provoke.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use slog::{o, Drain, Logger, OwnedKVList, Record};

/// A logger writing to stderr (or the file `path`), at `level` and above.
///
/// A record that cannot be written (the file system holding the log is full, stderr is a
/// closed pipe) is dropped and counted, never a panic: the thread that logged goes on. The
/// next record that can be written is preceded by one saying how many were lost.
pub fn logger(path: Option<&std::path::Path>, level: slog::Level) -> std::io::Result<Logger> {
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match path {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            let d = slog_term::FullFormat::new(slog_term::PlainSyncDecorator::new(f)).build();
            Box::new(Degrading::new(d).filter_level(level).ignore_res())
        }
        None => {
            let d =
                slog_term::FullFormat::new(slog_term::PlainSyncDecorator::new(std::io::stderr()))
                    .build();
            Box::new(Degrading::new(d).filter_level(level).ignore_res())
        }
    };
    Ok(Logger::root(
        std::sync::Mutex::new(drain).ignore_res(),
        o!(),
    ))
}

/// A drain that drops the records its inner drain fails to write, counts them, and says how
/// many were lost once writing works again. It never returns an error (so nothing above it
/// can panic on one).
pub struct Degrading<D> {
    inner: D,
    lost: AtomicU64,
}

impl<D> Degrading<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Degrading<D> {
        Degrading {
            inner,
            lost: AtomicU64::new(0),
        }
    }

    /// Records dropped and not yet reported.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl<D: Drain> Drain for Degrading<D> {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            static NOTE: slog::RecordStatic<'static> =
                slog::record_static!(slog::Level::Warning, "");
            let written = self.inner.log(
                &Record::new(
                    &NOTE,
                    &format_args!("log records were lost: the log could not be written"),
                    slog::b!("lost" => lost),
                ),
                values,
            );
            if written.is_err() {
                self.lost.fetch_add(lost + 1, Ordering::Relaxed);
                return Ok(());
            }
        }
        if self.inner.log(record, values).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
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
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A writer that fails while `full` is set (a full file system), else keeps the text.
    #[derive(Clone, Default)]
    struct Disk {
        full: Arc<std::sync::atomic::AtomicBool>,
        text: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Disk {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.full.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.text.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A full log degrades: the records are dropped and counted, no thread panics, and the
    /// loss is reported once the log can be written again.
    #[test]
    fn a_full_log_drops_records_and_says_so_later() {
        let disk = Disk::default();
        let d =
            slog_term::FullFormat::new(slog_term::PlainSyncDecorator::new(disk.clone())).build();
        let log = Logger::root(std::sync::Mutex::new(Degrading::new(d)).ignore_res(), o!());
        slog::info!(log, "first");
        disk.full.store(true, Ordering::Relaxed);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let log = log.clone();
                std::thread::spawn(move || slog::warn!(log, "while full"; "thread" => i))
            })
            .collect();
        for t in threads {
            t.join()
                .expect("a thread logging to a full log must not panic");
        }
        slog::info!(log, "still full");
        disk.full.store(false, Ordering::Relaxed);
        slog::info!(log, "writable again");
        let text = String::from_utf8(disk.text.lock().unwrap().clone()).unwrap();
        assert!(text.contains("first"), "{text}");
        assert!(!text.contains("while full"), "{text}");
        assert!(
            text.contains("log records were lost") && text.contains("lost: 5"),
            "{text}"
        );
        assert!(text.contains("writable again"), "{text}");
    }

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
