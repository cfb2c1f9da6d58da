//! The offline CUDA build (`benches/gpu/build.sh`): cubecl-cuda always pulls in cubecl-llvm,
//! whose build downloads an LLVM bundle. With `DOCS_RS` set it skips that download, and the
//! final link then lacks the LLVM C API and cubecl's three C++ shims. hearth never calls
//! them: the `cuda` feature turns on `cubecl/cuda-cpp`, so kernels compile through NVRTC.
//! This script satisfies those symbols with stubs that abort with a message naming the
//! function, so a binary that somehow reaches LLVM says why instead of crashing blind.
//!
//! The stubs are built only for `cuda` with `DOCS_RS` set and `HEARTH_LLVM_STUBS` not `0`
//! (`benches/gpu/refresh-symbols.sh` links without them to list what is missing). A build
//! with network, without `DOCS_RS`, links the real LLVM and no stub.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

const SYMBOLS: &str = "offline/llvm-symbols.txt";

fn main() {
    println!("cargo:rerun-if-env-changed=DOCS_RS");
    println!("cargo:rerun-if-env-changed=HEARTH_LLVM_STUBS");
    println!("cargo:rerun-if-changed={SYMBOLS}");
    let wanted = env::var_os("CARGO_FEATURE_CUDA").is_some()
        && env::var_os("DOCS_RS").is_some()
        && env::var("HEARTH_LLVM_STUBS").as_deref() != Ok("0");
    if !wanted {
        return;
    }
    let list = fs::read_to_string(SYMBOLS).unwrap_or_else(|e| panic!("{SYMBOLS}: {e}"));
    let mut c = String::from(
        "#include <stdio.h>\n#include <stdlib.h>\n\
         static void hearth_no_llvm(const char *name) {\n\
         \tfprintf(stderr, \"hearth: %s was called, but this offline CUDA build carries no \
         LLVM (its kernels compile through NVRTC); please report how it was reached\\n\", name);\n\
         \tabort();\n}\n",
    );
    for name in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(
            name.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
            "{SYMBOLS}: `{name}` is not a C identifier"
        );
        // The stubs never return, so the C signature does not need to match the real one.
        writeln!(c, "void {name}(void) {{ hearth_no_llvm(\"{name}\"); }}").expect("in memory");
    }
    let out = env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let source = Path::new(&out).join("llvm_stubs.c");
    fs::write(&source, c).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    // `-bundle` keeps the archive out of this rlib: the final link then lists it after every
    // Rust crate, where cubecl-llvm's references are already waiting for it.
    cc::Build::new()
        .file(&source)
        .flag("-ffunction-sections")
        .warnings(false)
        .cargo_metadata(false)
        .compile("hearth_llvm_stubs");
    println!("cargo:rustc-link-search=native={out}");
    println!("cargo:rustc-link-lib=static:-bundle=hearth_llvm_stubs");
}
