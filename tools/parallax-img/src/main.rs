//! `parallax-img`: create, inspect, snapshot, clone, check and measure Parallax images.
//! See `parallax-img --help`; the work is done in the library, [`parallax_img`].

fn main() {
    std::process::exit(parallax_img::main_with(std::env::args_os()));
}
