//! The `credgate` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    credgate::cli::main()
}
