//! The WeChat stand-in and callback driver as a program, for the local demo (docs/wechat.md).
//!
//! ```text
//! wechat-standin api --listen 127.0.0.1:7300 --app APPID:SECRET [--app ...]
//!     serves the stand-in of WeChat's API and prints every message it accepts
//! wechat-standin say --url CALLBACK_URL --app-id APPID --token TOKEN [--aes-key KEY]
//!                    [--standin http://127.0.0.1:7300] --from OPENID [--msg-id N] TEXT
//!     posts one customer message to an account's server URL as WeChat does (signed, encrypted
//!     with --aes-key, retried 3 times after 5 s without an answer), then tells the stand-in
//!     that the customer wrote (their 48-hour window opens)
//! wechat-standin agent --ws ws://127.0.0.1:7000/ws --token TOKEN
//!     an agent at a terminal: prints every message of its conversations; each line typed is
//!     sent to the conversation of the last message received
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chinwag_engine::wechat::message::{Body, Message, OpenId};
use chinwag_tests::wechat::driver::Driver;
use chinwag_tests::wechat::standin::StandIn;

fn usage() -> ! {
    eprintln!(
        "usage:\n  wechat-standin api --listen ADDR --app APPID:SECRET [--app ...]\n  \
         wechat-standin say --url URL --app-id APPID --token TOKEN [--aes-key KEY] \
         [--standin URL] --from OPENID [--msg-id N] TEXT\n  \
         wechat-standin agent --ws URL --token TOKEN"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else { usage() };
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut words = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        if let Some(name) = arg.strip_prefix("--") {
            let Some(value) = rest.next() else { usage() };
            flags.push((name.to_string(), value.clone()));
        } else {
            words.push(arg.clone());
        }
    }
    let flag = |name: &str| {
        flags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    match command.as_str() {
        "api" => {
            let listen = flag("listen").unwrap_or_else(|| "127.0.0.1:7300".into());
            let apps: Vec<(String, String)> = flags
                .iter()
                .filter(|(n, _)| n == "app")
                .map(|(_, v)| match v.split_once(':') {
                    Some((id, secret)) => (id.to_string(), secret.to_string()),
                    None => usage(),
                })
                .collect();
            if apps.is_empty() {
                usage();
            }
            let pairs: Vec<(&str, &str)> =
                apps.iter().map(|(a, s)| (a.as_str(), s.as_str())).collect();
            let standin = StandIn::start_on(&listen, &pairs);
            println!(
                "WeChat API stand-in on {} (api_base = \"{}\")",
                standin.addr(),
                standin.url()
            );
            let mut shown = 0;
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let delivered = standin.delivered();
                for d in &delivered[shown..] {
                    println!("custom/send {} -> {}: {}", d.app_id, d.touser, d.content);
                }
                shown = delivered.len();
            }
        }
        "say" => {
            let (Some(url), Some(app_id), Some(token), Some(from)) =
                (flag("url"), flag("app-id"), flag("token"), flag("from"))
            else {
                usage()
            };
            let Some(from) = OpenId::parse(&from) else {
                eprintln!("--from: an OpenID is ASCII letters, digits, - and _");
                std::process::exit(2);
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let msg_id = flag("msg-id")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as u64)
                });
            let mut driver = Driver::new(&url, &app_id, &token);
            if let Some(key) = flag("aes-key") {
                driver = driver.safe(&key);
            }
            let message = Message {
                to: "gh_demo".into(),
                from,
                create_time: now,
                msg_id: Some(msg_id),
                body: Body::Text {
                    content: words.join(" "),
                },
            };
            let delivery = driver.post(&message);
            println!(
                "attempts={} status={:?} answer={:?}",
                delivery.attempts, delivery.status, delivery.body
            );
            if delivery.status != Some(200) {
                std::process::exit(1);
            }
            if let Some(standin) = flag("standin") {
                let told = ureq::post(format!("{standin}/standin/customer_wrote"))
                    .query("appid", &app_id)
                    .query("openid", message.from.as_str())
                    .send("");
                if let Err(e) = told {
                    eprintln!("could not tell the stand-in: {e}");
                }
            }
        }
        "agent" => {
            let (Some(ws), Some(token)) = (flag("ws"), flag("token")) else {
                usage()
            };
            agent(&ws, &token);
        }
        _ => usage(),
    }
}

/// An agent at a terminal (see the module docs).
fn agent(ws: &str, token: &str) {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::{DeviceType, History, HistoryRange, Message as Wire, Send, Target};
    let mut client = Client::connect(ws, Encoding::Json).unwrap_or_else(|e| {
        eprintln!("connect {ws}: {e}");
        std::process::exit(1)
    });
    let me = client.login(token, DeviceType::Web).unwrap_or_else(|e| {
        eprintln!("login: {e}");
        std::process::exit(1)
    });
    println!(
        "logged in as {}; type a line to answer the last conversation",
        me.uid
    );
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut last_conv = None;
    let mut sent = 0u64;
    loop {
        match client.next_push(Duration::from_millis(200)) {
            Ok(Some(frame)) => match frame.message {
                Wire::Msg(m) => {
                    println!(
                        "[conv {} seq {}] {} ({}): {}",
                        m.conv, m.seq, m.from, m.kind, m.body
                    );
                    last_conv = Some(m.conv);
                }
                Wire::Members(m) => {
                    let names: Vec<String> = m.members.iter().map(|u| u.to_string()).collect();
                    println!("[conv {}] members: {}", m.conv, names.join(", "));
                    // Assigned to a conversation that already has messages: show them (an
                    // agent's screen loads the history the same way).
                    let history = client.call(Wire::History(History {
                        conv: m.conv,
                        range: HistoryRange::Newest,
                        limit: 20,
                    }));
                    if let Ok(Wire::HistoryOk(page)) = history.map(|f| f.message) {
                        for h in page.msgs {
                            println!(
                                "[conv {} seq {}] {} ({}): {}",
                                h.conv, h.seq, h.from, h.kind, h.body
                            );
                        }
                    }
                    last_conv = Some(m.conv);
                }
                other => println!("{other:?}"),
            },
            Ok(None) => {}
            Err(e) => {
                eprintln!("connection: {e}");
                std::process::exit(1)
            }
        }
        while let Ok(line) = lines.try_recv() {
            let Some(conv) = last_conv else {
                println!("(no conversation yet)");
                continue;
            };
            sent += 1;
            let answer = client.call(Wire::Send(Send {
                target: Target::Conv(conv),
                cmid: format!("demo-{}-{sent}", me.device_id).into(),
                kind: "text".into(),
                body: line.into(),
            }));
            match answer.map(|f| f.message) {
                Ok(Wire::SendOk(ok)) => println!("[conv {} seq {}] sent", ok.conv, ok.seq),
                other => println!("{other:?}"),
            }
        }
    }
}
