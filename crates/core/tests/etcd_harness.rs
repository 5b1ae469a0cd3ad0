//! The etcd test harness (tests/common/etcd.rs) and the etcd client build: a real cluster
//! serves puts and gets through etcd_client, also over TLS and after its leader is killed.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use etcd_cluster::EtcdCluster;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

async fn put_get(client: &mut etcd_client::Client, key: &str, value: &str) {
    client.put(key, value, None).await.unwrap();
    let got = client.get(key, None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);
    assert_eq!(got.kvs()[0].value(), value.as_bytes());
}

#[test]
fn one_member_serves_put_and_get() {
    let cluster = EtcdCluster::start(1);
    assert_eq!(cluster.endpoints().len(), 1);
    runtime().block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .unwrap();
        put_get(&mut client, "/harness/k", "v").await;
    });
    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("m0.log").exists());
    drop(cluster);
    assert!(!dir.exists(), "the cluster's directory is removed on drop");
}

#[test]
fn three_members_survive_a_killed_leader_and_a_paused_member() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    assert!(cluster.url("/p").starts_with("etcd://127.0.0.1:"));
    let rt = runtime();
    let leader = cluster.leader();
    cluster.kill(leader);
    let next = cluster.leader();
    assert_ne!(next, leader);
    let other = (0..3).find(|&i| i != leader && i != next).unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([&endpoints[other]], None)
            .await
            .unwrap();
        put_get(&mut client, "/harness/after-kill", "v").await;
    });
    cluster.restart(leader);
    cluster.pause(other);
    assert_eq!(cluster.live_endpoints().len(), 2);
    cluster.leader();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([&endpoints[leader]], None)
            .await
            .unwrap();
        put_get(&mut client, "/harness/after-restart", "v").await;
    });
    cluster.resume(other);
    assert_eq!(cluster.live_endpoints().len(), 3);
}

#[test]
fn tls_cluster_serves_rustls_clients_that_trust_its_ca() {
    let cluster = EtcdCluster::start_tls(1);
    assert!(cluster.url("p").starts_with("etcds://"));
    let ca = etcd_client::Certificate::from_pem(cluster.ca_pem().unwrap());
    let endpoint = format!("https://{}", cluster.endpoints()[0]);
    runtime().block_on(async {
        let tls = etcd_client::TlsOptions::new().ca_certificate(ca);
        let options = etcd_client::ConnectOptions::new().with_tls(tls);
        let mut client = etcd_client::Client::connect([&endpoint], Some(options))
            .await
            .unwrap();
        put_get(&mut client, "/harness/tls", "v").await;
        // Without the CA the server's certificate is not trusted.
        let untrusted = etcd_client::ConnectOptions::new().with_tls(etcd_client::TlsOptions::new());
        let refused = async {
            let mut c = etcd_client::Client::connect([&endpoint], Some(untrusted)).await?;
            c.get("/harness/tls", None).await
        };
        assert!(refused.await.is_err());
    });
}

#[test]
#[should_panic(expected = "etcd member m0 exited before it was ready")]
fn a_member_that_exits_before_it_is_ready_fails_the_start_with_its_log() {
    EtcdCluster::start_with_args(1, &["--no-such-flag"]);
}
