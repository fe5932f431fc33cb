//! The synchronous executor: whole reads and writes of one image through its own mapping
//! calls, with the data IO done by positional reads and writes on its storage. Tools, tests
//! and the fuzz target use it; [`crate::Chain`] wraps it for a whole chain.

use crate::error::{Error, Result};
use crate::image::Image;
use crate::map::Mapping;
use crate::write::GuestReader;

impl Image {
    /// Reads guest bytes into `buf`; unallocated ranges come from `backing` (zeroes
    /// without one).
    pub fn read_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let e = self.map_read(offset + done as u64, (buf.len() - done) as u64)?;
            let n = e.len as usize;
            let out = &mut buf[done..done + n];
            match e.mapping {
                Mapping::Data { offset: at } => self
                    .storage
                    .read_at(out, at)
                    .map_err(|e| Error::io("reading data", e))?,
                Mapping::Zero => out.fill(0),
                Mapping::Backing => match backing {
                    Some(b) => b.read_guest(offset + done as u64, out)?,
                    None => out.fill(0),
                },
                Mapping::Compressed { data, skip } => self.read_compressed(data, skip, out)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`: map, write the data, commit (or abort on failure).
    pub fn write_at(
        &mut self,
        offset: u64,
        buf: &[u8],
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let w = self.map_write(offset + done as u64, (buf.len() - done) as u64, backing)?;
            let n = w.len as usize;
            let r = self
                .storage
                .write_at(&buf[done..done + n], w.offset)
                .map_err(|e| Error::io("writing data", e));
            match (r, w.ticket) {
                (Ok(()), Some(t)) => self.commit(t)?,
                (Ok(()), None) => {}
                (Err(e), Some(t)) => {
                    self.abort(t);
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            }
            done += n;
        }
        Ok(())
    }
}
