//! rt-bench: walkie's latency benchmark, side by side with a Python asyncio peer.
//!
//! Placeholder: the benchmark itself is its own issue (DESIGN.md §5 lists the figures).
fn main() {
    eprintln!("rt-bench: not implemented yet (see DESIGN.md §5)");
    std::process::exit(2);
}
