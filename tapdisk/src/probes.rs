//! USDT probes (SystemTap SDT notes) at the four stages of a ring request, named like the
//! tracepoints XCP-ng added to its blktap, provider `tapdisk`:
//!
//! | probe | where | arguments |
//! | --- | --- | --- |
//! | `request_pull` | the request was copied off the ring, checked and admitted | id, blkif op, first sector, sectors |
//! | `driver_queue` | its first IO went to the image driver | id, backend IOs it became |
//! | `driver_complete` | its last IO came back from the driver | id, status (0 ok, -1 error) |
//! | `response_push` | its response was put on the ring | id, status |
//!
//! The id is the frontend's, unique among the requests in flight on one ring; each ring runs
//! on its own thread, so `(tid, id)` names a request. With no tracer attached a probe is one
//! `nop` and its arguments are values already in registers (the cost was measured with
//! `td-bench compare`: docs/operations.md). List them with
//! `bpftrace -l 'usdt:/usr/sbin/tapdisk:*'`; a latency histogram, ring pull to response:
//!
//! ```text
//! bpftrace -e 'usdt:/usr/sbin/tapdisk:tapdisk:request_pull { @t[tid, arg0] = nsecs; }
//!   usdt:/usr/sbin/tapdisk:tapdisk:response_push /@t[tid, arg0]/ {
//!     @us = hist((nsecs - @t[tid, arg0]) / 1000); delete(@t[tid, arg0]); }'
//! ```

#[cfg(feature = "usdt")]
use probe::probe;

/// Without the `usdt` feature (only to measure what the probes cost) a probe is nothing.
#[cfg(not(feature = "usdt"))]
macro_rules! probe {
    ($($t:tt)*) => {};
}

/// A request was admitted from the ring.
#[inline(always)]
#[allow(unused_variables)]
pub fn request_pull(id: u64, op: u8, sector: u64, sectors: u64) {
    probe!(tapdisk, request_pull, id, op, sector, sectors);
}

/// A request's first IO went to the driver, as `ios` backend IOs.
#[inline(always)]
#[allow(unused_variables)]
pub fn driver_queue(id: u64, ios: u32) {
    probe!(tapdisk, driver_queue, id, ios);
}

/// A request's last IO came back from the driver.
#[inline(always)]
#[allow(unused_variables)]
pub fn driver_complete(id: u64, status: i16) {
    probe!(tapdisk, driver_complete, id, status);
}

/// A request's response was pushed on the ring.
#[inline(always)]
#[allow(unused_variables)]
pub fn response_push(id: u64, status: i16) {
    probe!(tapdisk, response_push, id, status);
}
