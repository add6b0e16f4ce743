//! Build script: links the debug `taskgate` binary as a non-PIE executable on
//! Linux. A PIE debug binary spends ~0.5 ms of its start in the dynamic
//! loader applying ~66,000 relative relocations, before `main` can install
//! the signal handlers; that made a SIGHUP 1 ms after spawn kill the debug
//! binary (the one the tests run), though the release binary, with far fewer
//! relocations, installs them as early as this (measured: ~1.1 ms after
//! exec either way). Release builds stay position-independent (ASLR).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu && std::env::var("PROFILE").as_deref() == Ok("debug") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
