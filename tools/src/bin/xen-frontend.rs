//! `xen-frontend`: a (hostile) blkif frontend played from dom0, for the Xen rig. See
//! `xen-frontend --help` and [`tapdisk_tools::xenfront`].

fn main() {
    std::process::exit(tapdisk_tools::xenfront::main_with(std::env::args_os()));
}
