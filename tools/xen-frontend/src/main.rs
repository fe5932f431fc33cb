//! `xen-frontend`: a (hostile) blkif frontend played from dom0, for the Xen rig. See
//! `xen-frontend --help` and the library, [`xen_frontend`].

fn main() {
    std::process::exit(xen_frontend::main_with(std::env::args_os()));
}
