//! An owner re-learns where its users' devices are (docs/cluster.md, "What a node's loss
//! costs"): users whose devices node 2 owns are logged in on node 1; node 2 is SIGKILLed and
//! restarted, knowing none of their sessions; once its links are up, node 1 announces them.
//! Then a service's `presence` lists them, a service's `kick` closes one with 4001, and the same
//! device logging in on node 3 kicks the other, as before the restart. And the other way round:
//! a session that died with node 2's earlier run is not listed once node 2 is back.

use std::time::Duration;

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{DeviceType, Kick, Message, Online, Uid};
use chinwag_tests::buyer;
use chinwag_tests::cluster::{Cluster, ClusterSpec};

/// The longest a test waits for a push that should come (a bound against hanging).
const LONG: Duration = Duration::from_secs(20);

/// A client of node `n` logged in as `uid` on a web device, and the node that registered the
/// device: its owner (a DeviceId's cluster field is the number of the node that minted it, and
/// a device is registered by its user's owner, docs/cluster.md "DeviceIds and NodeIds").
fn login(cluster: &Cluster, n: u16, uid: Uid) -> (Client, u16) {
    let mut client = Client::connect(&cluster.ws_url(n), Encoding::Json)
        .unwrap_or_else(|e| panic!("connect to node {n}: {e}"));
    let ok = client
        .login(&cluster.token(uid), DeviceType::Web)
        .unwrap_or_else(|e| panic!("login of {uid} on node {n}: {e:?}"));
    (client, ok.device_id.unpack().cluster)
}

/// Waits for `client`'s `kicked` push and its close with 4001.
fn assert_kicked(client: &mut Client, who: &str) {
    let push = client
        .next_push(LONG)
        .unwrap_or_else(|e| panic!("{who}: {e:?}"))
        .unwrap_or_else(|| panic!("{who} was not kicked"));
    assert!(
        matches!(push.message, Message::Kicked(_)),
        "{who}: {push:?}"
    );
    match client.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(4001), "{who}"),
        other => panic!("{who}: expected close 4001, got {other:?}"),
    }
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_restarted_owner_lists_kicks_and_replaces_sessions_that_stayed_up_on_another_node() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        partitions: 8,
        shards: 2,
        // One replica: the restarted node owns its partitions again (with two, its follower
        // takes them over and the restarted node follows: the takeover path).
        replicas: Some(1),
        ..ClusterSpec::default()
    });
    // Two users whose devices node 2 owns, logged in on node 1.
    let mut users = Vec::new();
    for id in 1..200 {
        let (client, owner) = login(&cluster, 1, buyer(id));
        if owner == 2 {
            users.push((buyer(id), client));
            if users.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(users.len(), 2, "users owned by node 2");
    // A user whose devices another node owns, logged in on node 2: its session dies with it.
    let (died_uid, _died) = (200..400)
        .map(|id| (buyer(id), login(&cluster, 2, buyer(id))))
        .find(|(_, (_, owner))| *owner != 2)
        .map(|(uid, (client, _))| (uid, client))
        .expect("a user owned by node 1 or 3");
    let (kicked_uid, mut kicked_by_service) = users.remove(0);
    let (replaced_uid, mut replaced) = users.remove(0);
    let both = vec![kicked_uid, replaced_uid];
    let mut service = cluster.service(3);
    let presence = |service: &mut chinwag_protocol::service::ServiceClient| -> Vec<Online> {
        let reply = service.call(Message::Presence(both.clone())).unwrap();
        let Message::PresenceOk(online) = reply.message else {
            panic!("{reply:?}")
        };
        online
    };
    assert_eq!(presence(&mut service).len(), 2, "both online before");
    let online = |service: &mut chinwag_protocol::service::ServiceClient, uid| {
        let reply = service.call(Message::Presence(vec![uid])).unwrap();
        reply.message != Message::PresenceOk(Vec::new())
    };
    assert!(online(&mut service, died_uid));

    cluster.kill(2);
    cluster.restart(2);

    // Node 2 knew nothing of them after its restart; node 1 announced them when the link
    // between them came up.
    let mut service = cluster.service(3);
    cluster.wait_until("node 2 to list both users online again", |_| {
        presence(&mut service).len() == 2
    });
    // Its owner forgot the session that died with node 2's earlier run when the link came up.
    cluster.wait_until("the user whose session died with node 2 offline", |_| {
        !online(&mut service, died_uid)
    });

    let reply = service
        .call(Message::Kick(Kick {
            uid: kicked_uid,
            device: None,
        }))
        .unwrap();
    assert_eq!(
        reply.message,
        Message::KickOk(1),
        "the kick reached one session"
    );
    assert_kicked(&mut kicked_by_service, "the session a service kicked");

    // The same device logs in on node 3: the owner kicks the session on node 1.
    let (_again, owner) = login(&cluster, 3, replaced_uid);
    assert_eq!(owner, 2);
    assert_kicked(
        &mut replaced,
        "the session of a device that logged in again",
    );
}
