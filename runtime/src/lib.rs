//! Loads a kernel library written by `ccc compile` (manifest + PTX), runs it on the GPU and
//! validates it against the CPU reference. Links no LLVM: it travels to the GPU machine.
