//! Compiles `bpf/splice.bpf.c` into a BPF object with clang, on Linux only.
//!
//! The object is never committed: it is built from source here, and
//! `loader.rs` embeds it with `include_bytes!` from `OUT_DIR`. On other
//! operating systems nothing is compiled and the engine reports itself
//! unavailable at run time.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/splice.bpf.c");
    println!("cargo:rerun-if-changed=bpf/splice.h");
    println!("cargo:rerun-if-env-changed=CLANG");
    // CARGO_CFG_TARGET_OS is the target's OS, which is what matters when
    // cross-compiling (the build script itself runs on the host).
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let out_dir = match env::var_os("OUT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => fail("cargo did not set OUT_DIR"),
    };
    let out = out_dir.join("splice.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the
    // multiarch directory of the target (x86_64-linux-gnu, ...).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .arg(&multiarch)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            // v3: 64-bit compare-and-swap (BPF_ATOMIC), used to initialise
            // the timestamp offsets exactly once.
            "-mcpu=v3",
            "-c",
            "bpf/splice.bpf.c",
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "{clang} failed ({s}) compiling bpf/splice.bpf.c; it needs the Debian packages \
             clang and libbpf-dev (see scripts/packages.txt)"
        )),
        Err(e) => fail(&format!(
            "cannot run {clang} ({e}): install the Debian packages clang and libbpf-dev \
             (scripts/packages.txt) to build the kernel splice engine"
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("msocks-splice build: {msg}");
    std::process::exit(1);
}
