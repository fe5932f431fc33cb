//! `tap-ctl`: start, stop and inspect tapdisk-rs processes and the VBDs they serve.
//! See `tap-ctl --help`; the work is done in the library, [`tap_ctl`].

fn main() {
    std::process::exit(tap_ctl::main_with(std::env::args_os()));
}
