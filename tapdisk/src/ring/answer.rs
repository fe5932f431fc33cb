//! Answering: what the scheduler finished is unmapped, all of it at once (a copying transport
//! copies the reads' data back then, in one call), answered on the ring, counted and traced;
//! early reads are answered when their layer says so and released when their last page is in.
//! Responses are published once per loop iteration ([`RingLoop::publish`]).

use blkif::protocol::{status, Response};
use blkif::request::{Operation, Problem};
use blkif::transport::GrantMapper;
use slog::warn;

use super::early::{EarlyCx, Owed};
use super::{RingLoop, RingTransport};
use crate::early::Outcome;
use crate::trace::ReqRecord;

impl<T: RingTransport> RingLoop<T> {
    /// Puts one response on the ring (published later, with the batch).
    pub(super) fn respond(&mut self, id: u64, op: u8, st: i16) {
        self.t.parts().0.put_response(&Response {
            id,
            operation: op,
            status: st,
        });
    }

    /// Answers every request the scheduler finished.
    pub(super) fn answer(&mut self) {
        self.sched.take_finished(&mut self.scratch.finished);
        if self.scratch.finished.is_empty() {
            return;
        }
        let now = self.clock.now();
        let mut finished = std::mem::take(&mut self.scratch.finished);
        // Unmap before answering (a copying transport copies read data back here, and a
        // failed copy must not be answered as a successful read), every request at once.
        self.scratch.unmaps.clear();
        for &s in &finished {
            if self.table.is_chunk(s) {
                continue;
            }
            let req = self.table.slot(s).req;
            if req.op.writes() || matches!(req.op, Operation::Discard { .. }) {
                if let Some(c) = &self.env.cache {
                    c.invalidate(req.sector, req.nr_sectors);
                }
            }
            if req.op == Operation::Read {
                // Early-read frontends unmapped these pages when they queued the read.
                self.map_for_frontend(s);
            }
            if req.nr_segments > 0 {
                self.scratch.unmaps.push(self.table.slot(s).map);
            }
        }
        let n = self.scratch.unmaps.len();
        self.scratch.unmap_results.clear();
        self.scratch.unmap_results.resize(n, Ok(()));
        self.t
            .parts()
            .1
            .unmap_batch(&self.scratch.unmaps, &mut self.scratch.unmap_results);
        let mut k = 0;
        for &s in &finished {
            if self.table.is_chunk(s) {
                self.chunk_finished(s, now);
                continue;
            }
            let (req, st) = {
                let slot = self.table.slot(s);
                (slot.req, slot.status)
            };
            let mut st = st;
            if req.nr_segments > 0 {
                if let Err(p) = self.scratch.unmap_results[k] {
                    self.guest_error("unmap", req.id, &p);
                    st = status::ERROR;
                }
                k += 1;
            }
            self.respond_request(s, st, now);
            self.sched.release(s);
            self.table.release(s);
        }
        finished.clear();
        self.scratch.finished = finished;
    }

    /// Answers request `s` with `st` and accounts for it; its slot and grants stay held.
    pub(super) fn respond_request(&mut self, s: u32, st: i16, now: u64) {
        let (req, t) = {
            let slot = self.table.slot(s);
            (slot.req, slot.t)
        };
        self.respond(req.id, req.raw_op, st);
        crate::probes::response_push(req.id, st);
        self.table.answered(s);
        let stats = &self.env.stats;
        let c = match req.op {
            Operation::Read => &stats.read,
            Operation::Write => &stats.write,
            Operation::Flush | Operation::Barrier => &stats.flush,
            Operation::Discard { .. } => &stats.discard,
        };
        c.requests.add(1);
        c.sectors.add(req.nr_sectors);
        if st != status::OKAY && st != blkif::local::STATUS_EARLY {
            c.errors.add(1);
        }
        let complete = if t.complete == 0 { now } else { t.complete };
        let submit = if t.submit == 0 { t.sched } else { t.submit };
        let stages = &stats.stages;
        stages.validate.record(t.sched.saturating_sub(t.pop));
        stages.queue.record(submit.saturating_sub(t.sched));
        stages.io.record(complete.saturating_sub(submit));
        stages.respond.record(now.saturating_sub(complete));
        stats.latency.record(now.saturating_sub(t.pop));
        if let Some(tr) = &self.env.trace {
            tr.request(ReqRecord {
                id: req.id,
                op: req.raw_op,
                sector: req.sector,
                sectors: req.nr_sectors as u32,
                segments: req.nr_segments as u32,
                status: st,
                pop: t.pop,
                sched: t.sched,
                submit,
                complete,
                push: now,
            });
        }
        stats.in_flight.sub(1);
    }

    /// Releases request `s`'s grants (a copying transport copies read data back here).
    fn unmap_request(&mut self, s: u32) -> Result<(), Problem> {
        let slot = self.table.slot(s);
        if slot.req.nr_segments > 0 {
            let map = slot.map;
            self.t.parts().1.unmap(map)?;
        }
        Ok(())
    }

    /// Releases request slot `s`, answered already: its grants and the slot itself. (Only
    /// early reads get here, on the local transport, whose unmap cannot fail.)
    fn release_request(&mut self, s: u32) {
        if let Err(p) = self.unmap_request(s) {
            let id = self.table.slot(s).req.id;
            self.guest_error("unmap", id, &p);
        }
        self.table.release(s);
    }

    /// Maps every page of read `s` for an early-read frontend (nothing without one). A failure
    /// means the frontend broke its own mapping; its readers may fault, and are then served by
    /// the fault handler.
    fn map_for_frontend(&mut self, s: u32) {
        if let Some(port) = self.t.early_read() {
            let slot = self.table.slot(s);
            if let Err(e) = crate::early::continue_pages(port, &slot.segs[..slot.req.nr_segments]) {
                if self.guest_errors.check().is_some() {
                    warn!(self.env.log, "cannot map pages for the frontend"; "error" => %e);
                }
            }
        }
    }

    /// Starts read `s` through the early-read layer; false (nothing done) if the layer has no
    /// room for it now.
    pub(super) fn start_early(&mut self, s: u32, now: u64) -> bool {
        let (Some(layer), Some(port)) = (self.early.as_mut(), self.t.early_read()) else {
            return false;
        };
        let mut cx = EarlyCx {
            table: &mut self.table,
            sched: &mut self.sched,
            port,
            stats: &self.env.stats.early,
            errors: &mut self.guest_errors,
            log: &self.env.log,
        };
        match layer.start(&mut cx, s, now) {
            None => false,
            Some(outcome) => {
                self.early_next(s, outcome, now);
                true
            }
        }
    }

    /// Chunk slot `c` of an early read finished.
    fn chunk_finished(&mut self, c: u32, now: u64) {
        let (Some(layer), Some(port)) = (self.early.as_mut(), self.t.early_read()) else {
            return;
        };
        let mut cx = EarlyCx {
            table: &mut self.table,
            sched: &mut self.sched,
            port,
            stats: &self.env.stats.early,
            errors: &mut self.guest_errors,
            log: &self.env.log,
        };
        let (s, outcome) = layer.chunk_finished(&mut cx, c, now);
        self.early_next(s, outcome, now);
    }

    /// Acts on what the early-read layer says about read `s`.
    fn early_next(&mut self, s: u32, outcome: Outcome, now: u64) {
        let Some(layer) = self.early.as_mut() else {
            return;
        };
        match outcome {
            Outcome::Wait => {}
            Outcome::Answer(st) => {
                let st = layer.answering(s, st, &self.env.stats.early);
                self.respond_request(s, st, now);
            }
            Outcome::Done(st) => {
                match layer.finish(&self.table, s, st, &self.env.stats.early) {
                    Owed::Answer(st) => self.respond_request(s, st, now),
                    Owed::Report(ok) => {
                        let id = self.table.slot(s).req.id;
                        if let Err(e) = self.t.report_early_read_done(id, ok) {
                            warn!(self.env.log, "cannot send the completion of an early read";
                                  "id" => id, "error" => %e);
                        }
                    }
                    Owed::Nothing => {}
                }
                self.release_request(s);
            }
        }
    }
}
