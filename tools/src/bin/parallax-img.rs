//! `parallax-img`: create, inspect, snapshot, clone, check and measure Parallax images.
//! See `parallax-img --help`; the work is done in [`tapdisk_tools::parallaximg`].

fn main() {
    std::process::exit(tapdisk_tools::parallaximg::main_with(std::env::args_os()));
}
