//! The `keygate` binary: parses the command line (see `cli`) and runs the command.
//! Exit codes: 0 ok, 1 error, 2 usage error (clap's own parse errors also exit 2).

mod cli;

use std::process::ExitCode;

use clap::Parser;

use keygate::config::Config;

// The request path allocates in hyper's codec and header maps; mimalloc's thread-local free
// lists cost less there than glibc's bins (measured with benches/load.sh). See `alloc`.
#[global_allocator]
static GLOBAL: keygate::alloc::Allocator = keygate::alloc::Allocator;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args, serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(message) = &failure.message {
                eprintln!("{message}");
            }
            ExitCode::from(failure.code)
        }
    }
}

/// `keygate serve`: runs the gateway on a multi-threaded runtime until it shuts down.
fn serve(config: Config) -> cli::Outcome {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| cli::Failure::error(format!("cannot start the async runtime: {e}")))?;
    runtime
        .block_on(keygate::server::run(config))
        .map_err(|e| cli::Failure::error(format!("{e:#}")))
}
