//! A backend service in a few lines: tell a buyer an order shipped (`notify_users`), then write
//! into the buyer's chat as the shop's agent (`send_as`), idempotently.
//!
//! ```text
//! TOKEN=$(chinwag token --data-dir ./chinwag-data --uid service:1)
//! cargo run -p chinwag-protocol --example service -- 127.0.0.1:7001 "$TOKEN"
//! ```

use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{Message, NotifyUsers, Send, SendAs, Target, Uid, UidKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: service ADDR SERVICE_TOKEN");
        std::process::exit(2);
    };
    let mut service = ServiceClient::connect(&addr, &token)?;
    println!("authenticated as {}", service.auth().uid);
    let buyer = Uid::new(UidKind::Buyer, 1001);

    let notified = service.call(Message::NotifyUsers(NotifyUsers {
        users: vec![buyer],
        kind: "order".into(),
        body: r#"{"order":"A-17","state":"shipped"}"#.into(),
    }))?;
    println!("{:?}", notified.message);

    let sent = service.call(Message::SendAs(SendAs {
        from: Uid::new(UidKind::Agent, 7),
        send: Send {
            target: Target::User(buyer),
            // A retry with the same cmid gets the same answer and stores nothing.
            cmid: "order-A-17-shipped".into(),
            kind: "text".into(),
            body: "Your order A-17 is on its way.".into(),
        },
    }))?;
    println!("{:?}", sent.message);
    Ok(())
}
