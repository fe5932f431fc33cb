//! Layers: engines that wrap another engine and change only part of what it does.
//!
//! Fault injection and the slow-storage models sit between the scheduler and a driver's
//! engine. Each is a [`Layer`]: it says what it does with an IO from above, with an IO the
//! engine below finished, and with a completion of its own (a timer), and nothing else.
//! [`Layered`] turns a layer and the engine below into an [`Engine`]: it routes completions
//! (the layer's own user data range, or the engine below), forwards what the layer does not
//! change (poll descriptor, the description), and feeds what the
//! engine below reports, including IOs it finished synchronously inside a submit, back to the
//! layer until nothing is left.

use std::io;
use std::os::fd::RawFd;

use io_uring::squeue;

use super::engine::{BackendIo, Cqe, Done, Engine, UdRange, Uring};

/// What a layer sees of the world while it handles one event.
pub struct Cx<'a> {
    ring: &'a mut Uring,
    inner: &'a mut dyn Engine,
    inner_done: &'a mut Done,
    done: &'a mut Done,
    own: UdRange,
}

impl Cx<'_> {
    /// Hands `io` to the engine below; what it reports comes back through
    /// [`Layer::inner_done`].
    ///
    /// # Safety
    /// As [`Engine::submit`]: the iovecs and the memory they point to stay valid and
    /// untouched until the engine below reports `io.tag`.
    pub unsafe fn submit_inner(&mut self, io: BackendIo) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.submit(self.ring, io, self.inner_done) }
    }

    /// Reports IO `tag` finished with `res` (0 or `-errno`) to the layer above.
    pub fn report(&mut self, tag: u32, res: i32) {
        self.done.push(tag, res);
    }

    /// Pushes an operation of the layer's own, numbered `op` in its range (below
    /// [`Layer::own_ops`]); its completion comes back through [`Layer::own_done`].
    ///
    /// # Safety
    /// As [`Uring::push`]: whatever `e` points to stays valid until its completion.
    pub unsafe fn push_own(&mut self, op: u64, e: squeue::Entry) -> io::Result<()> {
        let e = e.user_data(self.own.ud(op));
        // SAFETY: forwarded from the caller.
        unsafe { self.ring.push(&e) }
    }
}

/// A wrapper around another engine; see the module docs.
pub trait Layer {
    /// For `describe`: "NAME over INNER".
    fn name(&self) -> String;

    /// How many operations of its own (timers) the layer numbers: the size of its user data
    /// range.
    fn own_ops(&self) -> u64 {
        0
    }

    /// An IO from above. By default it goes straight to the engine below.
    ///
    /// # Safety
    /// As [`Engine::submit`].
    unsafe fn submit(&mut self, cx: &mut Cx<'_>, io: BackendIo) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { cx.submit_inner(io) }
    }

    /// The engine below finished IO `tag` with `res`. By default it is reported up as is.
    fn inner_done(&mut self, cx: &mut Cx<'_>, tag: u32, res: i32) -> io::Result<()> {
        cx.report(tag, res);
        Ok(())
    }

    /// Operation `op` of the layer's own range completed with `res`.
    fn own_done(&mut self, _cx: &mut Cx<'_>, _op: u64, _res: i32) -> io::Result<()> {
        Ok(())
    }

    /// The most IOs the layer wants in flight, given what the engine below wants.
    fn max_in_flight(&self, inner: Option<u32>) -> Option<u32> {
        inner
    }

    /// How many IOs the storage works on at once, given what the engine below says.
    fn lanes(&self, inner: u32) -> u32 {
        inner
    }
}

/// A [`Layer`] over an engine, as an engine.
pub struct Layered<L: Layer> {
    layer: L,
    inner: Box<dyn Engine>,
    own: UdRange,
    /// What the engine below reported and the layer has not seen yet.
    inner_done: Done,
    /// The batch the layer is looking at (swapped with `inner_done`, so that the layer may
    /// submit more below while it handles one).
    batch: Done,
}

impl<L: Layer> Layered<L> {
    /// Puts `layer` over `inner`, whose IOs are tagged `0..tags`.
    pub fn new(layer: L, inner: Box<dyn Engine>, ring: &mut Uring, tags: u32) -> Layered<L> {
        let own = ring.reserve(layer.own_ops());
        Layered {
            layer,
            inner,
            own,
            inner_done: Done::with_capacity(tags as usize),
            batch: Done::with_capacity(tags as usize),
        }
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }

    fn cx<'a>(
        ring: &'a mut Uring,
        inner: &'a mut dyn Engine,
        inner_done: &'a mut Done,
        done: &'a mut Done,
        own: UdRange,
    ) -> Cx<'a> {
        Cx {
            ring,
            inner,
            inner_done,
            done,
            own,
        }
    }

    /// Hands what the engine below reported to the layer, until nothing is left.
    fn drain(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        while !self.inner_done.0.is_empty() {
            std::mem::swap(&mut self.inner_done, &mut self.batch);
            let mut batch = std::mem::take(&mut self.batch);
            let mut res = Ok(());
            for &(tag, r) in &batch.0 {
                let mut cx = Self::cx(ring, &mut *self.inner, &mut self.inner_done, done, self.own);
                res = self.layer.inner_done(&mut cx, tag, r);
                if res.is_err() {
                    break;
                }
            }
            batch.0.clear();
            self.batch = batch;
            res?;
        }
        Ok(())
    }
}

impl<L: Layer> Engine for Layered<L> {
    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let mut cx = Self::cx(ring, &mut *self.inner, &mut self.inner_done, done, self.own);
        // SAFETY: forwarded from our caller's submit contract.
        unsafe { self.layer.submit(&mut cx, io)? };
        self.drain(ring, done)
    }

    fn complete(&mut self, ring: &mut Uring, cqe: Cqe, done: &mut Done) -> io::Result<()> {
        if let Some(op) = self.own.index(cqe.ud) {
            let mut cx = Self::cx(ring, &mut *self.inner, &mut self.inner_done, done, self.own);
            self.layer.own_done(&mut cx, op, cqe.res)?;
        } else {
            self.inner.complete(ring, cqe, &mut self.inner_done)?;
        }
        self.drain(ring, done)
    }

    fn describe(&self) -> String {
        format!("{} over {}", self.layer.name(), self.inner.describe())
    }

    fn max_in_flight(&self) -> Option<u32> {
        self.layer.max_in_flight(self.inner.max_in_flight())
    }

    fn lanes(&self) -> u32 {
        self.layer.lanes(self.inner.lanes())
    }

    fn poll_fd(&self) -> Option<RawFd> {
        self.inner.poll_fd()
    }

    fn on_poll(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.inner.on_poll(ring, &mut self.inner_done)?;
        self.drain(ring, done)
    }
}
