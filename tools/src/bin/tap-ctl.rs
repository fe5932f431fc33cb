//! `tap-ctl`: start, stop and inspect tapdisk-rs processes and the VBDs they serve.
//! See `tap-ctl --help`; the work is done in [`tapdisk_tools::tapctl`].

fn main() {
    std::process::exit(tapdisk_tools::tapctl::main_with(std::env::args_os()));
}
