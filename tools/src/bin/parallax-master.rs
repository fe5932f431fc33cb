//! `parallax-master`: the extent master of striped disks. See `parallax-master --help`; the
//! work is done in [`tapdisk_tools::stripetools::master`].

fn main() {
    std::process::exit(tapdisk_tools::stripetools::master::main_with(
        std::env::args_os(),
    ));
}
