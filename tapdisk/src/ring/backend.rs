//! The ring's engine and the image it serves: built at start, rebuilt when the VBD resumes on
//! another image (`tap-ctl unpause -a`).

use std::io;
use std::sync::Arc;

use crate::driver::{make_engine, Engine, Image, Layers};
use crate::sys::uring::Uring;

/// The engine of one ring over the VBD's current image.
pub(super) struct Backend {
    image: Arc<dyn Image>,
    engine: Box<dyn Engine>,
    layers: Layers,
}

impl Backend {
    /// The engine over `image` for IOs tagged `0..tags`.
    pub(super) fn new(
        ring: &mut Uring,
        image: Arc<dyn Image>,
        layers: Layers,
        tags: u32,
    ) -> io::Result<Backend> {
        let engine = make_engine(&image, ring, tags, &layers)?;
        Ok(Backend {
            image,
            engine,
            layers,
        })
    }

    pub(super) fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    pub(super) fn engine_mut(&mut self) -> &mut dyn Engine {
        &mut *self.engine
    }

    /// Serves `image` from now on if it is not the one served: builds its engine (nothing may
    /// be in flight). True if the engine changed.
    pub(super) fn swap(
        &mut self,
        ring: &mut Uring,
        image: Arc<dyn Image>,
        tags: u32,
    ) -> io::Result<bool> {
        if std::ptr::addr_eq(Arc::as_ptr(&image), Arc::as_ptr(&self.image)) {
            return Ok(false);
        }
        self.engine = make_engine(&image, ring, tags, &self.layers)?;
        self.image = image;
        Ok(true)
    }
}
