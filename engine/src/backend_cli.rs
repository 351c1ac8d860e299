//! `chinwag backend ...`: the service port's ops from a shell, for operators and scripts. Each
//! subcommand connects, authenticates with a `service` token, makes one request and prints
//! the reply as one JSON line (the protocol's JSON mapping). An `error` reply is printed the
//! same way and exits with code 1.

use std::process::ExitCode;

use bytes::BytesMut;
use chinwag_protocol::client::ClientError;
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{
    json, AgentStats, ConvId, DeviceId, Frame, GroupCreate, GroupMembers, History, HistoryRange,
    Kick, Message, NotifyUsers, Profile, ProfileOf, Send, SendAs, Seq, ShopId, Subject, Target,
    Uid,
};

#[derive(clap::Args)]
pub struct BackendArgs {
    /// The node's service port.
    #[arg(long, default_value = "127.0.0.1:7001", env = "CHINWAG_BACKEND_ADDR")]
    addr: String,
    /// A token of kind service (`chinwag token --uid service:1 ...`).
    #[arg(long, env = "CHINWAG_SERVICE_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    op: BackendOp,
}

#[derive(clap::Subcommand)]
enum BackendOp {
    /// Store a message as a user (send_as).
    Send {
        /// The user the message is stored as, KIND:ID.
        #[arg(long)]
        from: Uid,
        /// An existing conversation (one of --conv, --shop, --user).
        #[arg(long, group = "target")]
        conv: Option<u64>,
        /// The sender's conversation with this shop.
        #[arg(long, group = "target")]
        shop: Option<u64>,
        /// The direct conversation with this user.
        #[arg(long, group = "target")]
        user: Option<Uid>,
        /// Client message id (idempotency key).
        #[arg(long)]
        cmid: String,
        /// Message kind.
        #[arg(long, default_value = "text")]
        kind: String,
        /// The body.
        body: String,
    },
    /// Push a transient `notify` to every device of the users (notify_users).
    Notify {
        /// The users, KIND:ID, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<Uid>,
        /// Message kind.
        #[arg(long, default_value = "text")]
        kind: String,
        /// The body.
        body: String,
    },
    /// Close every session of a user, or one device's.
    Kick {
        /// The user, KIND:ID.
        uid: Uid,
        /// Only this device.
        #[arg(long)]
        device: Option<DeviceId>,
    },
    /// Which devices of the users are online.
    Presence {
        /// The users, KIND:ID, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        users: Vec<Uid>,
    },
    /// Follow the message stream: one JSON line per batch (`stream_batch`: its messages and
    /// the position after them); restart with `--from` the last position printed to resume.
    Tail {
        /// A position printed earlier (default: from now).
        #[arg(long, default_value = "")]
        from: String,
    },
    /// A page of any conversation (conv_history).
    History {
        /// The conversation.
        conv: u64,
        /// The messages after this seq (default: the newest page).
        #[arg(long)]
        after: Option<u64>,
        /// The most messages (1..=200).
        #[arg(long, default_value_t = 50)]
        limit: u16,
    },
    /// Group conversations: create, add, remove (docs/backend.md, "Groups").
    Group {
        #[command(subcommand)]
        op: GroupCmd,
    },
    /// Any conversation's type, members (or their count) and last seq (conv_info).
    Info {
        /// The conversation.
        conv: u64,
    },
    /// Profiles: a user's nickname and avatar, a conversation's or shop's display name and
    /// avatar (docs/backend.md, "Profiles").
    Profile {
        #[command(subcommand)]
        op: ProfileCmd,
    },
    /// A shop's reception figures per agent over a window (agent_stats): assigned, open at
    /// the end, resolved, messages, first-reply time p50/p90.
    Stats {
        /// The shop.
        shop: u64,
        /// The window's start, ms since the Unix epoch (default: 24 hours before --to).
        #[arg(long)]
        from_ms: Option<u64>,
        /// The window's end, ms since the Unix epoch (default: now).
        #[arg(long)]
        to_ms: Option<u64>,
    },
}

#[derive(clap::Subcommand)]
enum GroupCmd {
    /// Create the group KEY names (once per key) with its first members.
    Create {
        /// The service's own id for the group (a retry with it answers with the same group).
        key: u64,
        /// The members, KIND:ID, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        users: Vec<Uid>,
    },
    /// Add users to a group.
    Add {
        /// The group.
        conv: u64,
        /// The users, KIND:ID, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        users: Vec<Uid>,
    },
    /// Remove members from a group.
    Remove {
        /// The group.
        conv: u64,
        /// The members, KIND:ID, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        users: Vec<Uid>,
    },
}

#[derive(clap::Subcommand)]
enum ProfileCmd {
    /// Set a profile (set_profile); a field not given is cleared.
    Set {
        #[command(flatten)]
        subject: SubjectArgs,
        /// The nickname (of a user) or display name (of a conversation or shop).
        #[arg(long, alias = "nick", default_value = "")]
        name: String,
        /// The avatar URL.
        #[arg(long, default_value = "")]
        avatar: String,
    },
    /// Show a profile (get_profile).
    Get {
        #[command(flatten)]
        subject: SubjectArgs,
    },
}

/// Whose profile: exactly one of --user, --conv, --shop.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct SubjectArgs {
    /// A user, KIND:ID.
    #[arg(long)]
    user: Option<Uid>,
    /// A direct or group conversation.
    #[arg(long)]
    conv: Option<u64>,
    /// A shop.
    #[arg(long)]
    shop: Option<u64>,
}

impl SubjectArgs {
    fn subject(&self) -> Subject {
        match (self.user, self.conv, self.shop) {
            (Some(uid), _, _) => Subject::User(uid),
            (_, Some(conv), _) => Subject::Conv(ConvId(conv)),
            // clap requires exactly one of the three.
            (_, _, shop) => Subject::Shop(ShopId(shop.unwrap_or_default())),
        }
    }
}

pub fn run(args: BackendArgs) -> ExitCode {
    let message = match args.op {
        BackendOp::Tail { from } => return tail(&args.addr, &args.token, &from),
        BackendOp::Send {
            from,
            conv,
            shop,
            user,
            cmid,
            kind,
            body,
        } => {
            let target = match (conv, shop, user) {
                (Some(conv), None, None) => Target::Conv(ConvId(conv)),
                (None, Some(shop), None) => Target::Shop(ShopId(shop)),
                (None, None, Some(user)) => Target::User(user),
                _ => {
                    eprintln!("chinwag: give one of --conv, --shop, --user");
                    return ExitCode::from(2);
                }
            };
            Message::SendAs(SendAs {
                from,
                send: Send {
                    target,
                    cmid: cmid.into(),
                    kind: kind.into(),
                    body: body.into(),
                },
            })
        }
        BackendOp::Notify { users, kind, body } => Message::NotifyUsers(NotifyUsers {
            users,
            kind: kind.into(),
            body: body.into(),
        }),
        BackendOp::Kick { uid, device } => Message::Kick(Kick { uid, device }),
        BackendOp::Presence { users } => Message::Presence(users),
        BackendOp::History { conv, after, limit } => Message::ConvHistory(History {
            conv: ConvId(conv),
            range: after.map_or(HistoryRange::Newest, |s| HistoryRange::After(Seq(s))),
            limit,
        }),
        BackendOp::Group { op } => match op {
            GroupCmd::Create { key, users } => Message::GroupCreate(GroupCreate { key, users }),
            GroupCmd::Add { conv, users } => Message::GroupAdd(GroupMembers {
                conv: ConvId(conv),
                users,
            }),
            GroupCmd::Remove { conv, users } => Message::GroupRemove(GroupMembers {
                conv: ConvId(conv),
                users,
            }),
        },
        BackendOp::Info { conv } => Message::ConvInfo(ConvId(conv)),
        BackendOp::Profile { op } => match op {
            ProfileCmd::Set {
                subject,
                name,
                avatar,
            } => Message::SetProfile(ProfileOf {
                subject: subject.subject(),
                profile: Profile { name, avatar },
            }),
            ProfileCmd::Get { subject } => Message::GetProfile(subject.subject()),
        },
        BackendOp::Stats {
            shop,
            from_ms,
            to_ms,
        } => {
            let to_ms = to_ms.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            });
            Message::AgentStats(AgentStats {
                shop: ShopId(shop),
                from_ms: from_ms.unwrap_or(to_ms.saturating_sub(24 * 3_600_000)),
                to_ms,
            })
        }
    };
    let result = ServiceClient::connect(&args.addr, &args.token).and_then(|mut service| {
        let req = service.send(message)?;
        service.wait(req)
    });
    match result {
        Ok(frame) => {
            let failed = matches!(frame.message, Message::Error(_));
            let _ = print_json(&frame);
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(ClientError::Rejected(e)) => {
            let _ = print_json(&Frame::new(Message::Error(e)));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("chinwag: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints every batch of the stream until the connection ends or stdout is closed.
fn tail(addr: &str, token: &str, from: &str) -> ExitCode {
    use std::io::Write;
    let mut service = match ServiceClient::connect(addr, token) {
        Ok(service) => service,
        Err(e) => {
            eprintln!("chinwag: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The stream has no end: a read may wait as long as the stream is quiet.
    if let Err(e) = service.set_timeout(std::time::Duration::from_secs(24 * 3600)) {
        eprintln!("chinwag: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = service.send(Message::Subscribe(from.into())) {
        eprintln!("chinwag: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        match service.next_frame() {
            Ok(frame) => {
                let failed = matches!(frame.message, Message::Error(_));
                // A reader that went away (a closed pipe) ends the tail.
                if print_json(&frame).is_err() || std::io::stdout().flush().is_err() {
                    return ExitCode::SUCCESS;
                }
                if failed {
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("chinwag: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

fn print_json(frame: &Frame<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = BytesMut::new();
    json::encode(frame, &mut out);
    out.extend_from_slice(b"\n");
    std::io::stdout().lock().write_all(&out)
}
