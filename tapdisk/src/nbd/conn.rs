//! One NBD connection: the handshake ([`super::handshake`]), then transmission
//! ([`super::transmission`]) against the connection's [`Disk`].
//!
//! Protocol violations end the connection with an `Err` of kind `InvalidData` (the caller logs
//! it); errors the client can recover from get an error reply and the connection goes on.

use std::io::{self, BufReader, BufWriter, Write};

use slog::debug;

use super::disk::Disk;
use super::handshake::handshake;
use super::stream::{End, Source};
use super::transmission::{transmission, ConnCx};

/// Drives one connection to its end. `connect` gives the connection its disk once the
/// client enters transmission; `on_transmission` runs then, before the first request is read
/// (the server sets its idle timeout there: each time a read times out with nothing under
/// way, the connection gives back buffer memory beyond [`KEEP_IDLE`]).
pub fn serve<R: Source, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    cx: &ConnCx<'_>,
    connect: impl FnOnce() -> io::Result<Box<dyn Disk>>,
    on_transmission: impl FnOnce(&mut BufReader<R>) -> io::Result<()>,
) -> io::Result<End> {
    let mut opt_buf = Vec::new();
    if let Some(end) = handshake(r, w, cx.export, &mut opt_buf, cx.log)? {
        return Ok(end);
    }
    drop(opt_buf);
    let mut disk = connect()?;
    on_transmission(r)?;
    debug!(cx.log, "transmission");
    transmission(r, w, &mut *disk, cx)
}
