//! The `walkie` binary: parse arguments, run, map the result to an exit code. Nothing else.
fn main() {
    std::process::exit(walkie::cli::main(std::env::args_os().skip(1).collect()));
}
