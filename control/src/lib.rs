//! The control surface of tapdisk-rs: everything a client of a tapdisk needs, and nothing of
//! the daemon (no io_uring, no image drivers).
//!
//! Each tapdisk listens on `<rundir>/tapdisk-rs/ctl/tapdisk-<pid>.sock` ([`RunDir`], by
//! default blktap3's `/run/blktap-control`), holds the markers of the minors it serves
//! ([`minor`]: blktap3's scheme, shared with its tools) and serves each VBD over NBD at
//! blktap3's `<rundir>/nbd<pid>.<minor>`. The protocol
//! ([`proto`]) is one JSON object per line in each direction, request then response, versioned
//! by a `v` field; [`client`] is the calling side, shared by tap-ctl, tapback, td-bench and
//! the tests. The serving side is the daemon's (`tapdisk::daemon`).
//!
//! A VBD is opened from an [`ImageSpec`] (a driver and its image, travelling as its parts) and
//! [`VbdSettings`], whose values are the option types here: [`DirectIo`], [`EarlyPolicy`],
//! [`FaultPlan`], [`ModelParams`] and [`NbdListen`]. Every numeric setting has its range
//! written once, in [`limits`] (blkif's from blkif's own constants); tap-ctl and the daemon
//! check with the same [`VbdSettings::validate`], so what one refuses the other refuses too.
//! The daemon also checks the sizes a VBD's settings drive against the machine it runs on
//! ([`VbdSettings::validate_on`], [`Machine`]).
//! Failures are one [`Error`] type. Every control exchange is bounded in time as a whole
//! ([`proto::Command::deadline`]), and so is a tapdisk's start-up ([`client::START_TIMEOUT`]).
//! Whether a process is alive is decided one way for every component ([`process::pid_alive`]:
//! a zombie is gone), and text bound for line-based output is escaped one way ([`escape`]).

pub mod client;
pub mod early;
mod error;
pub mod escape;
pub mod faults;
pub mod image;
pub mod limits;
pub mod machine;
pub mod minor;
pub mod model;
pub mod nbd;
pub mod process;
pub mod proto;
mod rundir;
pub mod settings;

pub use early::EarlyPolicy;
pub use error::{Error, Result};
pub use faults::FaultPlan;
pub use image::{DirectIo, Driver, ImageSpec};
pub use machine::Machine;
pub use model::ModelParams;
pub use nbd::NbdListen;
pub use rundir::{RunDir, DEFAULT_RUNDIR, RUNDIR_ENV};
pub use settings::VbdSettings;
