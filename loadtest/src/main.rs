//! The `warbler-loadtest` binary; see the library for what it does.

fn main() -> std::process::ExitCode {
    warbler_loadtest::cli::main()
}
