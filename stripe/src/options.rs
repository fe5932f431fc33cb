//! The data path's settings, apart from the path so that the disk it drives can take them
//! without importing the path.

use std::time::Duration;

pub use iscsi::Drive;

/// Bytes per LBA on the LUNs (the only block size served).
pub const BLOCK: u64 = 512;

/// Settings of the data path.
#[derive(Clone)]
pub struct Options {
    /// Commands in flight per server session.
    pub queue_depth: u16,
    /// How long commands wait for a dropped server before failing.
    pub reconnect_timeout: Duration,
    /// Time limit of one command.
    pub command_timeout: Duration,
    /// Logger (connection events, stale marks; never per IO).
    pub logger: slog::Logger,
    /// Which thread drives each server's connection: an IO thread per server (the default:
    /// servers' socket work in parallel on other cores) or the event loop's own thread
    /// ([`Drive::Inline`]: no hand-off between threads, less CPU per command).
    pub drive: Drive,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            queue_depth: 128,
            reconnect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            drive: Drive::Thread,
        }
    }
}
