//! Calls the cluster must refuse: every RPC of every service walked with every kind of
//! caller against the authorization table, and money moved by someone other than the
//! operator. Real daemons on loopback, this process a driver among them.

mod harness;

use std::time::Duration;

use harness::Cluster;
use ionet::auth::ClusterToken;
use ionet::authz::{Access, TABLE};
use ionet::rpc::proto::metering::{AddCreditsRequest, BalancesRequest, RefundRequest, SettleRequest};
use ionet::rpc::RawCodec;
use tonic::Code;

/// How a call ended: its status code and message (`Ok` for a stream that ended well).
type Outcome = (Code, String);

/// Calls `path` at `address` with the raw message `body` and the bearer `credential`.
fn call(address: &str, path: &'static str, credential: Option<&str>, body: Vec<u8>) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap_or_else(|err| panic!("{address} unreachable: {err}"));
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(tokio_stream::iter(vec![body]));
            if let Some(credential) = credential {
                request.metadata_mut().insert("authorization", format!("Bearer {credential}").parse().unwrap());
            }
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            match grpc.streaming(request, path, RawCodec).await {
                Err(status) => (status.code(), status.message().to_string()),
                Ok(response) => match response.into_inner().message().await {
                    Err(status) => (status.code(), status.message().to_string()),
                    Ok(_) => (Code::Ok, String::new()),
                },
            }
        };
        // A refusal is immediate; a call admitted to a stream that stays open is admitted.
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or((Code::DeadlineExceeded, "admitted; still open".into()))
    })
}

fn refused(outcome: &Outcome) -> bool {
    matches!(outcome.0, Code::Unauthenticated | Code::PermissionDenied)
}

/// Every row of the table, called at its server by nobody, by a stranger, by a member
/// and by the admin. The message is a malformed one, so that an admitted call fails in
/// decoding and no handler changes anything.
fn every_rpc_is_answered_as_the_table_says() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    cluster.init();
    let session = cluster.session();
    let token = std::fs::read_to_string(session.join("token")).unwrap().trim().to_string();
    let admin = std::fs::read_to_string(session.join("admin_credential")).unwrap().trim().to_string();
    let stranger = ClusterToken::generate();
    let head = cluster.address();
    let node = ionet::testing::local_node_address().unwrap();
    let worker = ionet::testing::core_worker_address().unwrap();

    for rule in TABLE {
        let (address, at_head) = match rule.path.split('.').nth(1) {
            Some("gcs") | Some("metering") => (head.as_str(), true),
            Some("node") | Some("object") => (node.as_str(), false),
            Some("worker") => (worker.as_str(), false),
            other => panic!("{}: a service of no known server ({other:?})", rule.path),
        };
        let malformed = || vec![0xff; 8];

        let nobody = call(address, rule.path, None, malformed());
        assert_eq!(nobody.0, Code::Unauthenticated, "{} without a credential: {nobody:?}", rule.path);
        assert!(nobody.1.contains("missing credential"), "{}: {nobody:?}", rule.path);

        let wrong = call(address, rule.path, Some(stranger.as_str()), malformed());
        assert_eq!(wrong.0, Code::Unauthenticated, "{} with a stranger's token: {wrong:?}", rule.path);

        let member = call(address, rule.path, Some(&token), malformed());
        match rule.access {
            Access::Admin => {
                assert_eq!(member.0, Code::PermissionDenied, "{} as a member: {member:?}", rule.path);
                for named in ["cluster member", rule.path, "admin role"] {
                    assert!(member.1.contains(named), "{}: the refusal names {named:?}: {member:?}", rule.path);
                }
            }
            Access::Member => assert!(!refused(&member), "{} as a member: {member:?}", rule.path),
        }

        let operator = call(address, rule.path, Some(&admin), malformed());
        if at_head {
            assert!(!refused(&operator), "{} as the admin: {operator:?}", rule.path);
        } else {
            // Servers off the head do not hold the head's public key yet: they accept no
            // signed credential at all, rather than trust one they cannot check.
            assert_eq!(operator.0, Code::Unauthenticated, "{} as the admin: {operator:?}", rule.path);
            assert!(operator.1.contains("accepts no signed credentials"), "{}: {operator:?}", rule.path);
        }
    }
}

/// A member (any node daemon, driver or worker) cannot add credits, refund or settle;
/// the ledger is as before; the operator can, with the credential the head wrote.
fn only_the_operator_moves_money() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    let session = cluster.session();
    let token = ClusterToken::new(&std::fs::read_to_string(session.join("token")).unwrap()).unwrap();
    let admin = ClusterToken::new(&std::fs::read_to_string(session.join("admin_credential")).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for secret in ["token", "admin_credential", "signing_key"] {
        let mode = std::fs::metadata(session.join(secret)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{secret} is the owner's alone");
    }
    assert_eq!(std::fs::metadata(session).unwrap().permissions().mode() & 0o777, 0o700);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let address = cluster.address();
        let mut member = ionet::rpc::metering_client(&address, &token).await.unwrap();
        let before = member.balances(BalancesRequest {}).await.unwrap().into_inner();

        let credit = AddCreditsRequest { account: "mallory".into(), amount_micros: 1_000_000_000 };
        let status = member.add_credits(credit.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = member.refund(RefundRequest { account: "mallory".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = member.settle(SettleRequest { dry_run: false }).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let after = member.balances(BalancesRequest {}).await.unwrap().into_inner();
        assert_eq!(format!("{before:?}"), format!("{after:?}"), "the refused calls changed nothing");

        let mut operator = ionet::rpc::metering_client(&address, &admin).await.unwrap();
        let balance = operator.add_credits(credit).await.unwrap().into_inner().balance_micros;
        assert_eq!(balance, 1_000_000_000);
        operator.settle(SettleRequest { dry_run: true }).await.unwrap();
    });
    // The CLI finds the operator's credential in the session directory.
    let text = cluster.ionet(&["credits", "refund", "--account", "mallory"]);
    assert!(text.contains("refunded $1000"), "{text}");
}

fn main() {
    harness::run(
        &[
            ("every_rpc_is_answered_as_the_table_says", every_rpc_is_answered_as_the_table_says),
            ("only_the_operator_moves_money", only_the_operator_moves_money),
        ],
        Duration::from_secs(240),
    );
}
