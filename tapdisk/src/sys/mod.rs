//! System calls and kernel interfaces the daemon uses, wrapped once: the ring loop's io_uring
//! with its user data ranges ([`uring`]), CPU placement of threads that work in pairs ([`cpu`]), the file and block-device calls of the drivers
//! ([`file`]), and allocations a setting sizes, which fail instead of aborting ([`mem`]). `unsafe` for these lives here; the rest of the daemon calls safe functions.

pub mod cpu;
pub mod file;
pub mod mem;
pub mod uring;
