//! Progress of long runs: a bar (indicatif, on stderr) when stdout is a terminal, and a plain
//! line on stderr every 5 s otherwise (logs, CI, pipes), so neither a person watching nor a
//! script reading the results gets the other's output.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How far a run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// This many requests or IOs.
    Count(u64),
    /// This long.
    Time(Duration),
}

/// How often a plain line is printed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The progress of one run.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    goal: Goal,
    start: Instant,
    last: Instant,
}

impl Progress {
    /// A bar if stdout is a terminal, plain lines otherwise.
    pub fn new(label: &'static str, goal: Goal) -> Progress {
        Progress::with(label, goal, std::io::stdout().is_terminal())
    }

    /// A bar (`tty`) or plain lines.
    pub fn with(label: &'static str, goal: Goal, tty: bool) -> Progress {
        let bar = tty.then(|| {
            let (len, template) = match goal {
                Goal::Count(n) => (
                    n,
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                ),
                Goal::Time(d) => (
                    d.as_millis() as u64,
                    "{prefix} [{elapsed_precise}/{duration_precise}] {wide_bar} {msg}",
                ),
            };
            let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(template) {
                b.set_style(style);
            }
            b.set_prefix(label);
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            label,
            goal,
            start: now,
            last: now,
        }
    }

    /// Whether a bar is drawn.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// `done` requests so far; `note` says more (errors, rates), asked for only when shown.
    /// Returns the plain line printed, if one was due.
    pub fn update(&mut self, done: u64, note: impl FnOnce() -> String) -> Option<String> {
        match &self.bar {
            Some(b) => {
                b.set_position(match self.goal {
                    Goal::Count(_) => done,
                    Goal::Time(_) => self.start.elapsed().as_millis() as u64,
                });
                if self.last.elapsed() >= Duration::from_millis(200) {
                    self.last = Instant::now();
                    b.set_message(format!("{done} done, {}", note()));
                }
                None
            }
            None if self.last.elapsed() >= PLAIN_EVERY => {
                self.last = Instant::now();
                let of = match self.goal {
                    Goal::Count(n) => format!("{done}/{n}"),
                    Goal::Time(d) => format!(
                        "{done} in {:.0}/{:.0} s",
                        self.start.elapsed().as_secs_f64(),
                        d.as_secs_f64()
                    ),
                };
                let line = format!("td-bench {}: {of}, {}", self.label, note());
                eprintln!("{line}");
                Some(line)
            }
            None => None,
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_every_few_seconds_without_a_terminal() {
        let mut p = Progress::with("verify", Goal::Count(100), false);
        assert!(!p.is_bar());
        assert_eq!(p.update(1, || "0 failed".into()), None);
        p.last -= PLAIN_EVERY;
        assert_eq!(
            p.update(40, || "0 failed".into()).as_deref(),
            Some("td-bench verify: 40/100, 0 failed")
        );
        assert_eq!(p.update(41, || unreachable!()), None);
        p.finish();
    }

    #[test]
    fn a_bar_on_a_terminal() {
        let mut p = Progress::with("run", Goal::Time(Duration::from_secs(5)), true);
        assert!(p.is_bar());
        assert_eq!(p.update(10, || "x".into()), None);
        p.finish();
    }
}
