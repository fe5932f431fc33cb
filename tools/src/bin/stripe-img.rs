//! `stripe-img`: create, inspect and delete striped disks. See `stripe-img --help`; the work
//! is done in [`tapdisk_tools::stripetools::img`].

fn main() {
    std::process::exit(tapdisk_tools::stripetools::img::main_with(
        std::env::args_os(),
    ));
}
