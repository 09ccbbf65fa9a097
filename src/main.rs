//! The `kstyle` command line.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Like other command-line tools, end quietly when the reader of our stdout goes away
    // (`kstyle verify DIR | head`) instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
