//! What the tapdisk-rs tools share: how they report a bad command line ([`clap_exit`]) and a
//! failure ([`one_line`], [`main_for`]), write to a pipe ([`emit`]), and read and print byte
//! sizes ([`parse_size`], [`fmt_size`], [`fmt_bytes`]).
//!
//! Every tool reports a failure as one line, `TOOL: what went wrong`, on stderr, and exits 1;
//! a command line it cannot parse, as one line too, with exit status 2.

mod clap_error;
mod report;
mod units;

pub use clap_error::{clap_exit, clap_one_line};
pub use report::{emit, io_msg, main_for, one_line};
pub use units::{fmt_bytes, fmt_size, parse_size};
