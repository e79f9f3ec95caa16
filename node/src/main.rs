//! `protonode`: see `protonode --help`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use protonode::cli::{Cli, Command, LogFormat};
use protonode::control::{self, Call};
use protonode::{daemon, demo, output};
use serde_json::Value;

/// `println!` and `print!` for the commands' output: once stdout is
/// closed (`protonode history Blair | head -3`), the command ends quietly
/// instead of panicking, and `watch` stops.
macro_rules! println {
    () => {
        out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! print {
    ($($arg:tt)*) => {
        out(format_args!($($arg)*))
    };
}

/// The name of contact or group `id`, as `contacts` and `groups` show it.
async fn conversation_name(daemon: &mut control::Client, id: &str) -> Option<String> {
    let named = |list: Value| {
        list.as_array()?
            .iter()
            .find(|x| x["id"] == id)
            .and_then(|x| x["name"].as_str().map(String::from))
    };
    if let Some(name) = named(daemon.call(&Call::Contacts { all: true }).await.ok()?) {
        return Some(name);
    }
    named(daemon.call(&Call::Groups { all: true }).await.ok()?)
}

fn out(args: std::fmt::Arguments) {
    if !protonode::write_stdout(args) {
        std::process::exit(0);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // The daemon tells what it does; one-shot commands stay quiet.
    let default = match cli.command {
        Command::Daemon { .. } => "info",
        // The demo narrates; expected refusals are part of its story.
        Command::Demo => "error",
        _ => "warn",
    };
    // openmls logs an ERROR for what the node expects and handles (a retried
    // delivery's used-up key, say); the node reports its own errors, with
    // what to do. So openmls stays silent unless RUST_LOG names it
    // (RUST_LOG=info,openmls=debug shows them), also under RUST_LOG=info.
    let directives = match std::env::var("RUST_LOG") {
        Ok(set) if set.contains("openmls") => set,
        Ok(set) if !set.trim().is_empty() => format!("{set},openmls=off"),
        _ => format!("{default},openmls=off"),
    };
    let filter = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},openmls=off")));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a person at a terminal, not for a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = config::Paths::resolve(cli.data_dir.clone(), |k| std::env::var(k).ok())?;
    let json = cli.json;
    match cli.command {
        Command::Init {
            name,
            pronouns,
            emoji,
        } => {
            let report = daemon::init(&paths, &name, pronouns, emoji)?;
            if json {
                println!("{report}");
            } else {
                println!(
                    "Initialised protonode for {} in {} (peer id {}).",
                    name,
                    paths.data_dir().display(),
                    report["peer_id"].as_str().unwrap_or("")
                );
                println!(
                    "Start it with: protonode --data-dir {} daemon",
                    protonode::shell_word(paths.data_dir())
                );
            }
            Ok(())
        }
        Command::Daemon { listen, no_mdns } => {
            let config = daemon::load_config(&paths)?;
            daemon::run(paths, config, listen, no_mdns, json)
        }
        Command::Demo => {
            let summary = demo::run(json)?;
            if json {
                println!("{summary}");
            }
            Ok(())
        }
        command => {
            daemon::load_config(&paths)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime failed")?;
            runtime.block_on(client(&paths, command, json))
        }
    }
}

/// Prints a group command's answer: the group as JSON, or a sentence and
/// the roster.
/// A note on stderr when the group `id` just made shares its `name` with
/// another group of ours: a command naming either by name asks which.
async fn note_namesake_groups(daemon: &mut control::Client, name: &str, id: &str) {
    let same = |g: &&Value| {
        g["name"]
            .as_str()
            .is_some_and(|n| n.trim().to_lowercase() == name.trim().to_lowercase())
    };
    let listed = daemon.call(&Call::Groups { all: false }).await.ok();
    let namesakes = listed
        .as_ref()
        .and_then(Value::as_array)
        .map_or(0, |l| l.iter().filter(same).count());
    if namesakes > 1 {
        eprintln!(
            "note: you are in {namesakes} groups called \"{}\"; a command that names one by name asks which, so name this one by its id, {id}",
            output::shown(name),
        );
    }
}

fn group_result(v: &Value, json: bool, done: &str) {
    if json {
        println!("{v}");
    } else {
        println!("{done}");
        print!("{}", output::groups(&Value::Array(vec![v.clone()])));
    }
}

/// Prints a subscription's events until the daemon stops. A daemon killed
/// mid-line leaves a reset connection or a partial line: stopped too when
/// following it.
async fn watch_events(
    daemon: &mut control::Client,
    json: bool,
    follow: bool,
) -> anyhow::Result<()> {
    loop {
        let note = match daemon.read().await {
            Ok(Some(note)) => note,
            Ok(None) | Err(control::ClientError::Io(_)) => return Ok(()),
            Err(_) if follow => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let event = note.get("params").cloned().unwrap_or(Value::Null);
        if json {
            println!("{event}");
        } else {
            let line = output::event(&event);
            if !line.is_empty() {
                println!("{line}");
            }
        }
    }
}

/// Connects to the daemon once it runs (for `watch --follow`).
async fn wait_for_daemon(paths: &config::Paths) -> anyhow::Result<control::Client> {
    loop {
        tokio::time::sleep(WATCH_RECONNECT).await;
        match control::Client::connect(&paths.control_socket()).await {
            Ok(daemon) => return Ok(daemon),
            Err(control::ClientError::NoDaemon { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Two contacts one introduces or invites together go by one name.
fn same_person_note(name: &str) -> String {
    format!(
        "note: two of them go by {}: if they are one person (two relationships with you), their node takes one place and declines the other",
        output::shown(name)
    )
}

/// How often `watch --follow` looks for a daemon that stopped.
const WATCH_RECONNECT: std::time::Duration = std::time::Duration::from_millis(500);

async fn client(paths: &config::Paths, command: Command, json: bool) -> anyhow::Result<()> {
    paths.check_socket_path()?;
    let mut daemon = match (
        &command,
        control::Client::connect(&paths.control_socket()).await,
    ) {
        (_, Ok(daemon)) => daemon,
        // watch --follow waits for a daemon that is not running yet, too.
        (Command::Watch { follow: true }, Err(control::ClientError::NoDaemon { .. })) => {
            eprintln!("No daemon is running yet; waiting for it.");
            wait_for_daemon(paths).await?
        }
        (_, Err(e)) => return Err(e.into()),
    };
    let print_json = |v: &Value| println!("{v}");
    match command {
        Command::Invite { qr, expires_in } => {
            let v = daemon
                .call(&Call::Invite {
                    expires_in_secs: expires_in,
                })
                .await?;
            let ticket = v["ticket"].as_str().unwrap_or_default();
            if json {
                print_json(&v);
            } else {
                println!("{ticket}");
                eprintln!(
                    "Give this ticket to one person; it works once and expires at {}.",
                    v["expires_at"].as_str().unwrap_or("?")
                );
            }
            if qr {
                use std::io::IsTerminal as _;
                let paint = if json {
                    std::io::stderr().is_terminal()
                } else {
                    std::io::stdout().is_terminal()
                };
                let code = output::qr(ticket, paint).context("drawing the QR code failed")?;
                if json {
                    eprintln!("{code}");
                } else {
                    println!("{code}");
                }
                // A ticket holds a key package: its code is wider than the
                // usual 80 columns, and a wrapped code does not scan.
                let width = output::qr_width(ticket).unwrap_or(0);
                if paint && width > 80 {
                    eprintln!(
                        "The code is {width} columns wide: if its lines wrap, widen the terminal (or make its font smaller) and run this again, or pass the ticket as text."
                    );
                }
            }
        }
        Command::Accept { ticket } => {
            let v = daemon.call(&Call::Accept { ticket }).await?;
            if json {
                print_json(&v);
            } else {
                let name = v["name"].as_str().unwrap_or("them");
                let contact = v["contact"].as_str().unwrap_or("");
                if v["delivered"] == Value::Bool(true) {
                    println!("You are now connected with {name} (contact {contact}).");
                } else {
                    println!(
                        "{name} is your contact {contact}, but {name}'s node has not taken your answer yet (it may be unreachable): the answer stays queued and goes out when it can, and you are connected once it has taken it."
                    );
                }
            }
        }
        Command::Contacts { all } => {
            let v = daemon.call(&Call::Contacts { all }).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", output::contacts(&v));
            }
        }
        Command::Contact { contact } => {
            let v = daemon.call(&Call::Contact { contact }).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", output::trust_record(&v));
            }
        }
        Command::Link {
            contact_1,
            contact_2,
            force,
        } => {
            let v = daemon
                .call(&Call::Link {
                    contacts: vec![contact_1.clone(), contact_2.clone()],
                    force,
                })
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("Linked: {contact_1} and {contact_2} are both you towards that person.");
            }
        }
        Command::Merge(command) => {
            use protonode::cli::MergeCommand as M;
            match command {
                M::Request {
                    contact_1,
                    contact_2,
                    force,
                } => {
                    let v = daemon
                        .call(&Call::MergeRequest {
                            contacts: vec![contact_1, contact_2],
                            force,
                        })
                        .await?;
                    if json {
                        print_json(&v);
                    } else {
                        println!(
                            "Asked {} to merge (request {}); the relationships become one when they accept.",
                            v["name"].as_str().unwrap_or("them"),
                            v["id"].as_str().unwrap_or("")
                        );
                    }
                }
                M::List => {
                    let v = daemon.call(&Call::MergeList {}).await?;
                    if json {
                        print_json(&v);
                    } else {
                        print!("{}", output::merges(&v));
                    }
                }
                M::Accept { id } => {
                    let v = daemon.call(&Call::MergeAccept { id }).await?;
                    if json {
                        print_json(&v);
                    } else {
                        println!(
                            "Merged: {} is now one relationship (contact {}), with the history of both.",
                            v["name"].as_str().unwrap_or("them"),
                            v["contact"].as_str().unwrap_or("")
                        );
                        if v["delivered"] != Value::Bool(true) {
                            println!("Their node has not taken your answer yet (it may be unreachable); the answer stays queued and goes out when it can.");
                        }
                    }
                }
                M::Ignore { id } => {
                    let v = daemon.call(&Call::MergeIgnore { id }).await?;
                    if json {
                        print_json(&v);
                    } else {
                        println!("Ignored: the two relationships stay apart.");
                    }
                }
            }
        }
        Command::Send {
            contact,
            text,
            wait,
            timeout,
        } => {
            let wait_secs = wait.then_some(timeout);
            let sent = daemon
                .call(&Call::Send {
                    to: contact.clone(),
                    text,
                    wait_secs,
                })
                .await;
            // Not delivered in time, but queued: a script still gets the
            // message's id on stdout (the error goes to stderr as always).
            if let (true, Err(control::ClientError::Remote(e))) = (json, &sent) {
                if let Some(data) = &e.data {
                    print_json(data);
                }
            }
            let v = sent?;
            if json {
                print_json(&v);
            } else {
                let status = v["status"].as_str().unwrap_or("queued");
                let id = v["message"].as_str().unwrap_or("");
                // Named as the node knows it: the command may have used an
                // id, a prefix or another spelling.
                let contact = match v["to"].as_str() {
                    Some(to) => conversation_name(&mut daemon, to).await.unwrap_or(contact),
                    None => contact,
                };
                match v["recipients"].as_u64() {
                    Some(0) => println!("Kept in {contact}'s history (message {id}): you are its only member, so no one else receives it."),
                    Some(n) => {
                        let members = if n == 1 { "member" } else { "members" };
                        println!("{status} to {contact}, {n} other {members} (message {id})")
                    }
                    None => println!("{status} to {contact} (message {id})"),
                }
            }
        }
        Command::History { contact } => {
            let v = daemon.call(&Call::History { of: contact }).await?;
            if json {
                print_json(&v);
            } else {
                // Authors are contacts (1:1) or group members (by key id).
                let mut names = daemon.call(&Call::Contacts { all: true }).await?;
                let groups = daemon.call(&Call::Groups { all: true }).await?;
                if let (Some(list), Some(groups)) = (names.as_array_mut(), groups.as_array()) {
                    for g in groups {
                        for m in g["members"].as_array().into_iter().flatten() {
                            list.push(serde_json::json!({ "id": m["id"], "name": m["name"] }));
                        }
                    }
                }
                print!("{}", output::history(&v, &names));
            }
        }
        Command::Status => {
            let v = daemon.call(&Call::Status {}).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", output::status(&v));
            }
        }
        Command::Watch { follow } => {
            let mut first = true;
            loop {
                // The first subscription's failure is the command's; later
                // ones (a daemon stopping again just as it came back) are
                // waited out like a stop.
                let subscribed = daemon.call(&Call::Watch {}).await;
                match subscribed {
                    Ok(_) => {
                        // On stderr in both modes: scripts can wait for it
                        // to know that nothing from now on is missed.
                        eprintln!("Watching; press Ctrl-C to stop.");
                        watch_events(&mut daemon, json, follow).await?;
                    }
                    Err(e) if first || !follow => return Err(e.into()),
                    Err(_) => {}
                }
                first = false;
                if !follow {
                    anyhow::bail!(
                        "the daemon stopped (`protonode watch --follow` waits for it to come back)"
                    );
                }
                eprintln!("The daemon stopped; waiting for it to come back.");
                daemon = wait_for_daemon(paths).await?;
            }
        }
        Command::Introduce {
            contact_b,
            contact_c,
            name,
            again,
        } => {
            let v = daemon
                .call(&Call::Introduce {
                    contacts: vec![contact_b.clone(), contact_c.clone()],
                    name: name.clone(),
                    again,
                })
                .await?;
            if let (Some(name), Some(id)) = (&name, v["group"].as_str()) {
                note_namesake_groups(&mut daemon, name, id).await;
            }
            if json {
                print_json(&v);
            } else {
                let names: Vec<&str> = v["introduced"]
                    .as_array()
                    .map(|l| l.iter().filter_map(Value::as_str).collect())
                    .filter(|l: &Vec<&str>| l.len() == 2)
                    .unwrap_or_else(|| vec![contact_b.as_str(), contact_c.as_str()]);
                println!(
                    "Introduced {} and {} in group {}. They see each other as placeholders you assert, until they claim.",
                    names[0],
                    names[1],
                    v["group"].as_str().unwrap_or("")
                );
                if names[0].trim().to_lowercase() == names[1].trim().to_lowercase() {
                    eprintln!("{}", same_person_note(names[0]));
                }
            }
        }
        Command::Groups { all } => {
            let v = daemon.call(&Call::Groups { all }).await?;
            if json {
                print_json(&v);
            } else if all && v.as_array().is_some_and(Vec::is_empty) {
                println!("No groups, neither now nor before.");
            } else {
                print!("{}", output::groups(&v));
            }
        }
        Command::Claim {
            group,
            wait,
            timeout,
        } => {
            let wait_secs = wait.then_some(timeout);
            let v = daemon.call(&Call::Claim { group, wait_secs }).await?;
            let ordered = v["state"] == "active" && v["claiming"] == Value::Bool(false);
            let done = if wait || ordered {
                "Claimed: your own key has replaced the placeholder, and the members see you."
            } else {
                "Claimed: your own key replaces the placeholder (members see it once the group orders the change; --wait waits for it)."
            };
            group_result(&v, json, done);
        }
        Command::Decline { group } => {
            let v = daemon.call(&Call::Decline { group }).await?;
            group_result(
                &v,
                json,
                "Declined: the introducer will remove the placeholder made for you.",
            );
        }
        Command::Connect { group, member } => {
            let v = daemon.call(&Call::Connect { group, member }).await?;
            if json {
                print_json(&v);
            } else if v["delivered"] == Value::Bool(true) {
                println!(
                    "Connected with {} (contact {}).",
                    v["name"].as_str().unwrap_or("them"),
                    v["contact"].as_str().unwrap_or("")
                );
            } else {
                println!(
                    "Invitation sent to {}; the contact appears once their node answers (contact {}).",
                    v["name"].as_str().unwrap_or("them"),
                    v["contact"].as_str().unwrap_or("")
                );
            }
            // Someone of that name we know already may be the same person.
            let (name, id) = (
                v["name"].as_str().unwrap_or_default(),
                v["contact"].as_str().unwrap_or_default(),
            );
            let contacts = daemon.call(&Call::Contacts { all: false }).await.ok();
            let namesake = contacts.as_ref().and_then(Value::as_array).and_then(|l| {
                l.iter().find(|c| {
                    c["id"] != id
                        && c["name"]
                            .as_str()
                            .is_some_and(|n| n.trim().eq_ignore_ascii_case(name.trim()))
                })
            });
            if let Some(other) = namesake.and_then(|c| c["id"].as_str()) {
                eprintln!(
                    "note: you already have a contact called {} ({other}); if it is the same person, `protonode merge request {other} {id}` asks them to make the two one relationship",
                    output::shown(name)
                );
            }
        }
        Command::Group(command) => {
            use protonode::cli::GroupCommand as G;
            let adding = match &command {
                G::Add { contact, .. } => Some(contact.clone()),
                _ => None,
            };
            let (call, done) = match command {
                G::Create { name, contacts } => (
                    Call::GroupCreate { name, contacts },
                    "Group created; the people you invited claim their places.",
                ),
                G::Add {
                    group,
                    contact,
                    wait,
                    timeout,
                } => (
                    Call::GroupAdd {
                        group,
                        contact,
                        wait_secs: wait.then_some(timeout),
                    },
                    if wait {
                        "Added: they are a placeholder until they claim their place."
                    } else {
                        "Adding them: they are listed once the group has ordered the change, as a placeholder until they claim their place (--wait waits for it)."
                    },
                ),
                G::Remove {
                    group,
                    member,
                    wait,
                    timeout,
                } => (
                    Call::GroupRemove {
                        group,
                        member,
                        wait_secs: wait.then_some(timeout),
                    },
                    if wait {
                        "Removed."
                    } else {
                        "Removing them: they leave the list once the group has ordered the change (--wait waits for it)."
                    },
                ),
                G::Leave { group } => (Call::GroupLeave { group }, "You left the group."),
                G::Update {
                    group,
                    wait,
                    timeout,
                } => (
                    Call::GroupUpdate {
                        group,
                        wait_secs: wait.then_some(timeout),
                    },
                    if wait {
                        "Your keys in the group are rotated."
                    } else {
                        "Your keys in the group are being rotated (--wait waits for it)."
                    },
                ),
                G::Verify { group, member } => {
                    (Call::GroupVerify { group, member }, "Marked as verified.")
                }
            };
            let creating = matches!(call, Call::GroupCreate { .. });
            let v = daemon.call(&call).await?;
            group_result(&v, json, done);
            if let Some(name) = output::shared_name(&v).filter(|_| creating) {
                eprintln!("{}", same_person_note(&name));
            }
            if let (true, Some(name), Some(id)) = (creating, v["name"].as_str(), v["id"].as_str()) {
                note_namesake_groups(&mut daemon, name, id).await;
            }
            if let Some(contact) = adding {
                // The contact's name, to compare with the members' (an
                // added contact is not in the roster until the change is
                // ordered); a note only, so a failure here says nothing.
                let named = daemon.call(&Call::Contact { contact }).await.ok();
                let name = named.as_ref().and_then(|c| c["contact"]["name"].as_str());
                if let Some(name) = name.filter(|n| output::has_namesake(&v, n)) {
                    eprintln!(
                        "note: a member called {} is already in the group, added by someone else; if it is the same person, their node declines this second introduction and your placeholder for them goes",
                        output::shown(name)
                    );
                }
            }
        }
        Command::Init { .. } | Command::Daemon { .. } | Command::Demo => {
            anyhow::bail!("this command does not talk to the daemon")
        }
    }
    Ok(())
}
