//! `stripe-img`: create, inspect and delete striped disks. See `stripe-img --help`; the work
//! is done in the library, [`stripe_img`].

fn main() {
    // Die quietly when the reader of our output goes away (`stripe-img info | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(stripe_img::main_with(std::env::args_os()));
}
