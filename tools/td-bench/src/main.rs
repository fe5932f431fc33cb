//! td-bench: verify and benchmark tapdisk-rs through its local blkif transport.
//! See `td-bench --help`; the code lives in the library, [`td_bench`].

fn main() {
    std::process::exit(td_bench::main());
}
