#![cfg(feature = "llvm")]
//! Without ptxas the checks must fail loudly and say how to get it. A separate test binary,
//! because it changes the process environment.

#[test]
fn codegen_missing_ptxas_is_an_error_naming_the_setup_script() {
    // SAFETY: this binary has no other test running concurrently that reads the environment.
    unsafe { std::env::set_var("CCC_PTXAS", "/nonexistent/ptxas") };
    let error = ccc::codegen::ptxas::assemble(".version 8.0\n.target sm_90a\n.address_size 64\n")
        .expect_err("ptxas cannot be found");
    assert!(error.contains("scripts/setup.sh"), "{error}");
}
