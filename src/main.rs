use clap::Parser;

use linkid::cli::{self, Cli};
use linkid::config::ConfigError;

// glibc's malloc was a seventh of the CPU per request under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let outcome = Cli::configuration(&cli)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            // Reads wait for one of `pool_size` connections: more blocking
            // threads than that only queue and switch.
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(config.database.pool_size as usize + 2)
                // An idle thread's SQLite snapshot would keep the WAL from
                // being reset: let it go.
                .on_thread_park(linkid::store::end_inline_reads)
                .build()?
                .block_on(cli::run(cli, config))
        });
    if let Err(error) = outcome {
        if let Some(cli::Exit(status)) = error.downcast_ref::<cli::Exit>() {
            std::process::exit(*status);
        }
        match error.downcast_ref::<ConfigError>() {
            Some(config_error) => {
                eprint!("linkid: {config_error}");
                std::process::exit(2);
            }
            None => {
                eprintln!("linkid: {error:#}");
                std::process::exit(1);
            }
        }
    }
}
