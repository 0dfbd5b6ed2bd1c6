//! `switchboard`: parses arguments and calls library code. Errors are reported
//! once, here, as one line on stderr with a non-zero exit.

mod args;

use std::process::ExitCode;

use args::{
    ChainsCommand, Cli, Command, DeadLettersCommand, EventsCommand, FilesCommand, InboundCommand,
    InboxCommand, MessagesCommand, NumbersCommand, PreferencesCommand, RecordsCommand, RunArgs,
    ScriptsCommand, SecretsCommand, TemplatesCommand, TimersCommand, TokensCommand,
};
use clap::Parser;
use switchboard_dispatcher::cli::{self, CliError, EmitArgs};
use switchboard_dispatcher::config::{Overrides, RuntimeConfig};
use switchboard_dispatcher::{Config, Dispatcher, demo};

/// mimalloc rather than the system allocator: an event allocates a few
/// hundred small blocks across threads, and glibc's arenas spent a tenth of
/// the dispatcher's time on them and on their locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run`'s configuration says how many threads its runtime has, so it is
    // read before the runtime starts.
    let (config, runtime) = match &cli.command {
        Command::Run(args) => match run_config(args) {
            Ok(config) => {
                let runtime = config.runtime.build();
                (Some(config), runtime)
            }
            Err(message) => return report(Err(Failure::Error(message))),
        },
        _ => (None, RuntimeConfig::default().build()),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(command(cli, config)),
        Err(e) => report(Err(Failure::Error(format!(
            "starting the async runtime: {e}"
        )))),
    }
}

/// Runs `cli`'s command; `config` is `run`'s.
async fn command(cli: Cli, config: Option<Config>) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run(args, config.expect("run's configuration is read"))
            .await
            .map_err(Failure::Error),
        Command::Demo(args) => {
            // Quiet internals; the `log` steps of the example chains still show.
            switchboard_dispatcher::init_logging(false, "warn,switchboard::log=info");
            demo::run(demo::DemoOptions {
                chains_dir: args.chains,
                listen: args.listen,
                once: args.once,
            })
            .await
            .map(|()| None)
            .map_err(|e| Failure::Error(e.to_string()))
        }
        Command::Emit(e) => {
            let args = EmitArgs {
                account: e.account,
                conversation_type: e.conversation_type,
                event_type: e.event_type,
                conversation: e.conversation,
                data: e.data,
                id: e.id,
            };
            print(cli::emit(&e.remote.client(), args, e.remote.json).await)
        }
        Command::Chains(c) => print(match c {
            ChainsCommand::Apply {
                files,
                merge,
                remote,
            } => cli::chains_apply(&remote.client(), &files, merge, remote.json).await,
            ChainsCommand::List { account, remote } => {
                cli::chains_list(&remote.client(), &account, remote.json).await
            }
            ChainsCommand::Show {
                account,
                chain,
                remote,
            } => cli::chains_show(&remote.client(), &account, chain.as_deref(), remote.json).await,
            ChainsCommand::History { account, remote } => {
                cli::chains_history(&remote.client(), &account, remote.json).await
            }
            ChainsCommand::Restore {
                account,
                chain_version,
                remote,
            } => cli::chains_restore(&remote.client(), &account, chain_version, remote.json).await,
            ChainsCommand::Test {
                account,
                event,
                remote,
            } => cli::chains_test(&remote.client(), &account, &event, remote.json).await,
            ChainsCommand::Rm {
                account,
                chain,
                remote,
                ..
            } => cli::chains_rm(&remote.client(), &account, chain.as_deref(), remote.json).await,
        }),
        Command::Events(EventsCommand::List {
            account,
            limit,
            before,
            conversation_type,
            event_type,
            conversation,
            status,
            remote,
        }) => {
            let query = cli::EventListQuery {
                limit: Some(limit),
                before,
                filters: cli::TailQuery {
                    conversation_type,
                    event_type,
                    conversation_key: conversation,
                    status,
                },
            };
            print(cli::events_list(&remote.client(), &account, &query, remote.json).await)
        }
        Command::Events(EventsCommand::Rerun {
            account,
            id,
            remote,
        }) => print(cli::events_rerun(&remote.client(), &account, &id, remote.json).await),
        Command::Handlers { account, remote } => {
            print(cli::handlers(&remote.client(), account.as_deref(), remote.json).await)
        }
        Command::Scripts(c) => print(match c {
            ScriptsCommand::Put {
                account,
                name,
                file,
                remote,
            } => cli::scripts_put(&remote.client(), &account, &name, &file, remote.json).await,
            ScriptsCommand::List { account, remote } => {
                cli::scripts_list(&remote.client(), &account, remote.json).await
            }
            ScriptsCommand::Show {
                account,
                name,
                at,
                remote,
            } => cli::scripts_show(&remote.client(), &account, &name, at, remote.json).await,
            ScriptsCommand::Test {
                account,
                name,
                event,
                remote,
            } => cli::scripts_test(&remote.client(), &account, &name, &event, remote.json).await,
            ScriptsCommand::Rm {
                account,
                name,
                remote,
            } => cli::scripts_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Timers(TimersCommand::List {
            account,
            limit,
            remote,
        }) => print(cli::timers_list(&remote.client(), &account, limit, remote.json).await),
        Command::Templates(c) => print(match c {
            TemplatesCommand::Put {
                account,
                slug,
                file,
                remote,
            } => cli::templates_put(&remote.client(), &account, &slug, &file, remote.json).await,
            TemplatesCommand::List { account, remote } => {
                cli::templates_list(&remote.client(), &account, remote.json).await
            }
            TemplatesCommand::Show {
                account,
                slug,
                at,
                remote,
            } => cli::templates_show(&remote.client(), &account, &slug, at, remote.json).await,
            TemplatesCommand::Versions {
                account,
                slug,
                remote,
            } => cli::templates_versions(&remote.client(), &account, &slug, remote.json).await,
            TemplatesCommand::Test {
                account,
                slug,
                context,
                recipient,
                remote,
            } => {
                cli::templates_test(
                    &remote.client(),
                    &account,
                    &slug,
                    context.as_deref(),
                    recipient.as_deref(),
                    remote.json,
                )
                .await
            }
            TemplatesCommand::Rm {
                account,
                slug,
                remote,
            } => cli::templates_rm(&remote.client(), &account, &slug, remote.json).await,
        }),
        Command::Trace {
            account,
            id,
            remote,
        } => print(cli::trace(&remote.client(), &account, &id, remote.json).await),
        Command::DeadLetters(d) => print(match d {
            DeadLettersCommand::List {
                account,
                limit,
                remote,
            } => cli::dead_letters_list(&remote.client(), &account, limit, remote.json).await,
            DeadLettersCommand::Show {
                account,
                id,
                remote,
            } => cli::dead_letters_show(&remote.client(), &account, &id, remote.json).await,
            DeadLettersCommand::Replay {
                account,
                id: Some(id),
                remote,
                ..
            } => cli::dead_letters_replay(&remote.client(), &account, &id, remote.json).await,
            DeadLettersCommand::Replay {
                account,
                chain,
                since,
                remote,
                ..
            } => {
                cli::dead_letters_replay_all(
                    &remote.client(),
                    &account,
                    chain.as_deref(),
                    since.as_deref(),
                    remote.json,
                )
                .await
            }
            DeadLettersCommand::Discard {
                account,
                id,
                remote,
            } => cli::dead_letters_discard(&remote.client(), &account, &id, remote.json).await,
        }),
        Command::Secrets(c) => print(match c {
            SecretsCommand::Set {
                account,
                name,
                value,
                remote,
            } => cli::secrets_set(&remote.client(), &account, &name, value, remote.json).await,
            SecretsCommand::List { account, remote } => {
                cli::secrets_list(&remote.client(), &account, remote.json).await
            }
            SecretsCommand::Rm {
                account,
                name,
                remote,
            } => cli::secrets_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Contacts(c) => print(match c {
            RecordsCommand::List {
                account,
                limit,
                remote,
            } => cli::contacts_list(&remote.client(), &account, limit, remote.json).await,
            RecordsCommand::Show {
                account,
                id,
                remote,
            } => cli::contacts_show(&remote.client(), &account, &id).await,
        }),
        Command::Messages(c) => print(match c {
            MessagesCommand::List {
                account,
                limit,
                remote,
            } => cli::messages_list(&remote.client(), &account, limit, remote.json).await,
            MessagesCommand::Show {
                account,
                id,
                remote,
            } => cli::messages_show(&remote.client(), &account, &id).await,
            MessagesCommand::Cancel {
                account,
                id,
                remote,
            } => cli::messages_cancel(&remote.client(), &account, &id, remote.json).await,
            MessagesCommand::Unmatched {
                account,
                limit,
                remote,
            } => cli::messages_unmatched(&remote.client(), &account, limit, remote.json).await,
        }),
        Command::Inbox(c) => print(match c {
            InboxCommand::List {
                account,
                receiver,
                limit,
                unread,
                category,
                archived,
                before,
                remote,
            } => {
                let query = cli::InboxQuery {
                    limit: Some(limit),
                    before,
                    unread: unread.then_some(true),
                    category,
                    archived: archived.then_some(true),
                };
                cli::inbox_list(&remote.client(), &account, &receiver, &query, remote.json).await
            }
            InboxCommand::Count {
                account,
                receiver,
                remote,
            } => cli::inbox_count(&remote.client(), &account, &receiver, remote.json).await,
            InboxCommand::Mark {
                account,
                receiver,
                id,
                action,
                remote,
            } => {
                cli::inbox_mark(
                    &remote.client(),
                    &account,
                    &receiver,
                    &id,
                    &action,
                    remote.json,
                )
                .await
            }
            InboxCommand::ReadAll {
                account,
                receiver,
                category,
                remote,
            } => {
                cli::inbox_read_all(
                    &remote.client(),
                    &account,
                    &receiver,
                    category.as_deref(),
                    remote.json,
                )
                .await
            }
            InboxCommand::Token {
                account,
                receiver,
                ttl,
                remote,
            } => {
                cli::inbox_token(
                    &remote.client(),
                    &account,
                    &receiver,
                    Some(&ttl),
                    remote.json,
                )
                .await
            }
            InboxCommand::RotateTokens { account, remote } => {
                cli::inbox_rotate_tokens(&remote.client(), &account, remote.json).await
            }
        }),
        Command::Files(c) => print(match c {
            FilesCommand::Put {
                account,
                name,
                path,
                remote,
            } => cli::files_put(&remote.client(), &account, &name, &path, remote.json).await,
            FilesCommand::List { account, remote } => {
                cli::files_list(&remote.client(), &account, remote.json).await
            }
            FilesCommand::Rm {
                account,
                name,
                remote,
            } => cli::files_rm(&remote.client(), &account, &name, remote.json).await,
        }),
        Command::Numbers(c) => print(match c {
            NumbersCommand::Add {
                account,
                transport,
                address,
                remote,
            } => {
                let at = (transport.as_str(), address.as_str());
                cli::numbers_add(&remote.client(), &account, at, remote.json).await
            }
            NumbersCommand::List { account, remote } => {
                cli::numbers_list(&remote.client(), &account, remote.json).await
            }
            NumbersCommand::Rm {
                account,
                transport,
                address,
                remote,
            } => {
                let at = (transport.as_str(), address.as_str());
                cli::numbers_rm(&remote.client(), &account, at, remote.json).await
            }
        }),
        Command::Preferences(c) => print(match c {
            PreferencesCommand::Show {
                account,
                contact,
                remote,
            } => cli::preferences_show(&remote.client(), &account, &contact, remote.json).await,
            PreferencesCommand::Set {
                account,
                contact,
                channel,
                choice,
                template,
                category,
                reason,
                remote,
            } => {
                let topic = match (template, category) {
                    (Some(slug), _) => Some(format!("template:{slug}")),
                    (None, Some(name)) => Some(format!("category:{name}")),
                    (None, None) => None,
                };
                let set = cli::SetPreference {
                    channel,
                    subscribed: choice == "in",
                    topic,
                    reason,
                };
                cli::preferences_set(&remote.client(), &account, &contact, set, remote.json).await
            }
        }),
        Command::Inbound(c) => print(match c {
            InboundCommand::Create {
                account,
                provider,
                secret,
                rotate,
                remote,
            } => {
                cli::inbound_create(
                    &remote.client(),
                    &account,
                    &provider,
                    secret.as_deref(),
                    rotate,
                    remote.json,
                )
                .await
            }
            InboundCommand::List { account, remote } => {
                cli::inbound_list(&remote.client(), &account, remote.json).await
            }
            InboundCommand::Revoke {
                account,
                provider,
                remote,
            } => cli::inbound_revoke(&remote.client(), &account, &provider, remote.json).await,
        }),
        Command::Tokens(c) => print(match c {
            TokensCommand::Create {
                account,
                name,
                remote,
            } => cli::tokens_create(&remote.client(), &account, name.as_deref(), remote.json).await,
            TokensCommand::List { account, remote } => {
                cli::tokens_list(&remote.client(), &account, remote.json).await
            }
            TokensCommand::Revoke {
                account,
                id,
                remote,
            } => cli::tokens_revoke(&remote.client(), &account, &id, remote.json).await,
        }),
    };
    report(result)
}

/// Prints a command's result and gives its exit code.
fn report(result: Result<Option<String>, Failure>) -> ExitCode {
    match result {
        Ok(Some(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failure::WouldFail { report, summary }) => {
            println!("{report}");
            eprintln!("switchboard: {summary}");
            ExitCode::from(cli::WOULD_FAIL_EXIT)
        }
        Err(Failure::Error(message)) => {
            eprintln!("switchboard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command did not succeed.
enum Failure {
    /// An error: one line on stderr, exit code 1.
    Error(String),
    /// A dry run that would fail: its report on stdout, which steps on
    /// stderr, exit code [`cli::WOULD_FAIL_EXIT`].
    WouldFail { report: String, summary: String },
}

fn print(result: Result<String, CliError>) -> Result<Option<String>, Failure> {
    result.map(Some).map_err(|e| match e {
        CliError::WouldFail { report, summary } => Failure::WouldFail { report, summary },
        other => Failure::Error(other.to_string()),
    })
}

/// `run`'s configuration: its file, with the flags and variables given.
fn run_config(args: &RunArgs) -> Result<Config, String> {
    let overrides = Overrides {
        nats_url: args.nats.clone(),
        replicated: args.replicated,
        standbys: args.standbys,
        data_dir: args.data.clone(),
        listen: args.listen,
        subject_prefix: args.subject_prefix.clone(),
        concurrency: args.concurrency,
        outbound_allow: args.outbound_allow.clone(),
        admin_token: std::env::var("SWITCHBOARD_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        public_url: args.public_url.clone(),
        worker_threads: args.worker_threads,
        event_threads: args.event_threads,
    };
    Config::load(args.config.as_deref(), overrides).map_err(|e| e.to_string())
}

async fn run(args: RunArgs, mut config: Config) -> Result<Option<String>, String> {
    let telemetry = switchboard_dispatcher::telemetry::init(
        args.log_format == "json",
        "info",
        Some(&config.otel),
    );
    let peers = if args.demo_peers {
        let peers = demo::DemoPeers::start(&mut config).await;
        Some(peers.map_err(|e| e.to_string())?)
    } else {
        None
    };
    let secrets = if peers.is_some() {
        demo::DemoPeers::SECRETS
    } else {
        &[]
    };
    let dispatcher = Dispatcher::start_with_secrets(config, args.chains.as_deref(), secrets)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(peers) = peers {
        eprintln!(
            "demo peers on http://{}: webhook secret \"gateway\" set for the accounts applied",
            demo::PEERS_ADDR
        );
        peers.log_what_arrives();
    }
    for applied in dispatcher.applied() {
        eprintln!(
            "applied {} → account {} {}",
            applied.path.display(),
            applied.account,
            applied
                .version
                .map_or("unchanged".to_string(), |v| format!("at chain version {v}"))
        );
    }
    if let Some(path) = dispatcher.admin_token_file() {
        eprintln!(
            "admin token in {} (for the CLI: export SWITCHBOARD_TOKEN=\"$(cat {})\")",
            path.display(),
            path.display()
        );
    }
    eprintln!(
        "console at http://{}/console (sign in with the admin token or an account token)",
        dispatcher.local_addr()
    );
    // The address on stdout, so that scripts (and tests) can find a port chosen by the OS.
    println!("listening on http://{}", dispatcher.local_addr());
    switchboard_dispatcher::runtime::wait_for_shutdown_signal().await;
    dispatcher.shutdown().await;
    telemetry.shutdown().await;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
