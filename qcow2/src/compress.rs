//! Compressed clusters: raw deflate streams (no zlib header), inflated into exactly one
//! cluster, as QEMU reads them (it accepts a stream that fills the cluster, ended or not, and
//! nothing shorter).

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::error::{corrupt, Result};

/// An inflater and a one-cluster cache of the last cluster it produced.
pub(crate) struct Inflater {
    state: Box<DecompressorOxide>,
    input: Vec<u8>,
    output: Vec<u8>,
    /// File offset of the compressed data `output` holds, if any.
    cached: Option<u64>,
}

impl Inflater {
    pub fn new(cluster_size: usize) -> Inflater {
        Inflater {
            state: Box::default(),
            input: Vec::new(),
            output: vec![0; cluster_size],
            cached: None,
        }
    }

    /// The cluster inflated from the data at `offset`, if it is the cached one.
    pub fn cached(&self, offset: u64) -> Option<&[u8]> {
        (self.cached == Some(offset)).then_some(&self.output[..])
    }

    /// A buffer of `len` bytes to read the compressed data into.
    pub fn input(&mut self, len: usize) -> &mut [u8] {
        self.cached = None;
        self.input.clear();
        self.input.resize(len, 0);
        &mut self.input
    }

    /// Inflates the input into the cluster buffer; remembers it as the data at `offset`.
    pub fn inflate(&mut self, offset: u64) -> Result<&[u8]> {
        self.cached = None;
        self.state.init();
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, _, out) = decompress(&mut self.state, &self.input, &mut self.output, 0, flags);
        let full = out == self.output.len();
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if full => {}
            // Input ended exactly when the cluster was full.
            TINFLStatus::FailedCannotMakeProgress if full => {}
            s => {
                return Err(corrupt!(
                    "compressed cluster at {offset:#x}: inflating gave {out} of {} bytes ({s:?})",
                    self.output.len()
                ))
            }
        }
        self.cached = Some(offset);
        Ok(&self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflates_exactly_one_cluster_or_refuses() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut inf = Inflater::new(4096);
        inf.input(packed.len()).copy_from_slice(&packed);
        assert_eq!(inf.inflate(7).unwrap(), &data[..]);
        assert!(inf.cached(7).is_some());
        // Too short a stream for the cluster.
        let short = miniz_oxide::deflate::compress_to_vec(&data[..100], 6);
        inf.input(short.len()).copy_from_slice(&short);
        assert!(inf.inflate(8).is_err());
        // Garbage.
        inf.input(16).fill(0xff);
        assert!(inf.inflate(9).is_err());
    }
}
