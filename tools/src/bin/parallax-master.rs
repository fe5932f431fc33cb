//! `parallax-master`: the extent master of striped disks. See `parallax-master --help`; the
//! work is done in [`tapdisk_tools::stripetools::master`].

fn main() {
    // Die quietly when the reader of our output goes away (`stripe-img info | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(tapdisk_tools::stripetools::master::main_with(
        std::env::args_os(),
    ));
}
