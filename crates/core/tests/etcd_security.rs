//! The etcd engine with authentication and TLS: the right user works; a wrong password or a
//! user without permission on the prefix is PermissionDenied and writes nothing; `etcds://`
//! with the cluster's CA connects, without it the open fails naming the certificate problem.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::time::Duration;

use etcd_client::{Client, GetOptions, Permission};
use etcd_cluster::EtcdCluster;
use kvstore_core::etcd::{ClusterDatabase, ClusterOptions, ClusterTls};
use kvstore_core::{envelope, ErrorCode, LockMode, MapOptions};

fn as_user(user: &str, password: &str) -> ClusterOptions {
    ClusterOptions {
        request_timeout: Duration::from_secs(3),
        auth: Some((user.into(), password.into())),
        ..ClusterOptions::default()
    }
}

#[test]
fn only_the_right_user_with_permission_on_the_prefix_gets_in() {
    let cluster = EtcdCluster::start(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(cluster.endpoints(), None).await.unwrap();
        c.role_add("root").await.unwrap();
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("app").await.unwrap();
        c.role_grant_permission("app", Permission::read_write("/app/").with_prefix())
            .await
            .unwrap();
        c.user_add("app", "apppw", None).await.unwrap();
        c.user_grant_role("app", "app").await.unwrap();
        c.user_add("other", "otherpw", None).await.unwrap();
        c.auth_enable().await.unwrap();
    });
    let url = cluster.url("app");

    let db = ClusterDatabase::open(&url, as_user("app", "apppw")).unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    map.lock("k", LockMode::New, None)
        .unwrap()
        .commit(envelope::encode(&[], b"v"))
        .unwrap();
    db.sync().unwrap();

    let err = ClusterDatabase::open(&url, as_user("app", "wrong"))
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    let err = ClusterDatabase::open(&url, as_user("other", "otherpw"))
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    // The app user has no permission elsewhere either.
    let err = ClusterDatabase::open(&cluster.url("elsewhere"), as_user("app", "apppw"))
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");

    // Nothing but the app user's writes is there.
    let keys: Vec<String> = rt.block_on(async {
        let mut root = Client::connect(
            cluster.endpoints(),
            Some(etcd_client::ConnectOptions::new().with_user("root", "rootpw")),
        )
        .await
        .unwrap();
        let all = root
            .get("", Some(GetOptions::new().with_all_keys().with_keys_only()))
            .await
            .unwrap();
        all.kvs()
            .iter()
            .map(|kv| String::from_utf8(kv.key().to_vec()).unwrap())
            .collect()
    });
    assert!(keys.iter().all(|k| k.starts_with("/app/")), "{keys:?}");
    assert!(keys.contains(&"/app/data/m/k".to_string()));
}

#[test]
fn tls_needs_the_clusters_ca() {
    let cluster = EtcdCluster::start_tls(1);
    let url = cluster.url("app");
    assert!(url.starts_with("etcds://"));
    let with_ca = ClusterOptions {
        request_timeout: Duration::from_secs(3),
        tls: Some(ClusterTls {
            ca: cluster.ca_pem(),
            ..ClusterTls::default()
        }),
        ..ClusterOptions::default()
    };
    let db = ClusterDatabase::open(&url, with_ca).unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    map.lock("k", LockMode::New, None)
        .unwrap()
        .commit(envelope::encode(&[], b"v"))
        .unwrap();

    let without = ClusterOptions {
        request_timeout: Duration::from_secs(2),
        ..ClusterOptions::default()
    };
    let err = ClusterDatabase::open(&url, without).err().unwrap();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    let message = err.to_string().to_lowercase();
    assert!(
        message.contains("certificate") || message.contains("unknownissuer"),
        "the message names the certificate problem: {err}"
    );
    // TLS options without etcds:// are refused.
    let plain = cluster.url("app").replacen("etcds://", "etcd://", 1);
    let err = ClusterDatabase::open(
        &plain,
        ClusterOptions {
            tls: Some(ClusterTls::default()),
            ..ClusterOptions::default()
        },
    )
    .err()
    .unwrap();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
}
