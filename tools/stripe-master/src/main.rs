//! `stripe-master`: the extent master of striped disks. See `stripe-master --help`; the
//! work is done in the library, [`stripe_master`].

fn main() {
    // Die quietly when the reader of our output goes away (`stripe-img info | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(stripe_master::main_with(std::env::args_os()));
}
