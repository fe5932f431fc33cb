//! Slow-storage models, for experiments: the IO is done for real (so data is right) and its
//! completion is held back until the modelled service time has passed (an io_uring timeout).
//! Every output that uses a model says so.
//!
//! - **Spindle** (the thesis's disk): one IO at a time, in arrival order, each costing
//!   `X + Y × size`, plus a positioning delay when it does not start where the previous one
//!   ended. The thesis (Table 3.1, direct writes of 4 KB to 1 MB on a Seagate 7200.11) fits
//!   X ≈ 335 µs and Y ≈ 4 µs per KB; those are the defaults, with 4170 µs (half a revolution
//!   at 7200 rpm, the mean rotational latency) to reposition.
//! - **Link** (remote storage behind a network link): IOs are in flight together; their data
//!   crosses one link of a given bandwidth one after another, and each completes a fixed
//!   latency after its last byte is through. What early read return is for.

mod disk;
mod link;

use tapdisk_control::ModelParams;

use super::engine::{Engine, Uring};
use super::layer::Layered;

/// `inner` behind the model `params` (its IOs tagged `0..tags`).
pub fn wrap(
    inner: Box<dyn Engine>,
    params: ModelParams,
    ring: &mut Uring,
    tags: u32,
) -> Box<dyn Engine> {
    match params {
        ModelParams::Spindle { .. } => Box::new(Layered::new(
            disk::Spindle::new(params, tags),
            inner,
            ring,
            tags,
        )),
        ModelParams::Link { latency_us, .. } => Box::new(Layered::new(
            link::Link::new(params, latency_us, tags),
            inner,
            ring,
            tags,
        )),
    }
}

/// A timespec for `ns` nanoseconds (relative, or absolute on CLOCK_MONOTONIC).
fn timespec(ns: u64) -> io_uring::types::Timespec {
    io_uring::types::Timespec::new()
        .sec(ns / 1_000_000_000)
        .nsec((ns % 1_000_000_000) as u32)
}
