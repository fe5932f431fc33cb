//! `tapback`: connects Xen guests' blkfront devices to tapdisk-rs. See `tapback --help`; the
//! work is done in the library, [`tapback`].

fn main() {
    std::process::exit(tapback::main_with(std::env::args_os()));
}
