//! td-bench: verify and benchmark tapdisk-rs through its local blkif transport.
//! See `td-bench --help`; the code lives in `tapdisk_tools::tdbench`.

fn main() {
    std::process::exit(tapdisk_tools::tdbench::main());
}
