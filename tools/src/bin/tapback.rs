//! `tapback`: connects Xen guests' blkfront devices to tapdisk-rs. See `tapback --help`; the
//! work is done in [`tapdisk_tools::tapback`].

fn main() {
    std::process::exit(tapdisk_tools::tapback::main_with(std::env::args_os()));
}
