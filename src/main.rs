use clap::Parser;

use linkid::cli::{self, Cli};
use linkid::config::ConfigError;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = cli::run(cli).await {
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
