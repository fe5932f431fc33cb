//! Operator tools for tapdisk-rs: `tap-ctl`, `td-bench`, `parallax-img`, `parallax-master` and
//! `stripe-img`. The binaries in
//! `src/bin` are thin wrappers around the modules here, so their parsing and formatting can be
//! unit-tested.

pub mod cli;
pub mod parallaximg;
pub mod stripetools;
pub mod tapback;
pub mod tapctl;
pub mod tdbench;
pub mod xenfront;
