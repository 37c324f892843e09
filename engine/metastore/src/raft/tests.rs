use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;
use crate::command::Kind;
use crate::RenewLease;

const TOKEN: &str = "cluster-secret";

/// One replica: its store, its Raft and the server on its port.
struct Replica {
    id: NodeId,
    metastore: Arc<Metastore>,
    replicated: Replicated,
    server: JoinHandle<()>,
}

async fn start_replica(
    id: NodeId,
    dir: PathBuf,
    listener: TcpListener,
    peers: &BTreeMap<NodeId, String>,
) -> Replica {
    std::fs::create_dir_all(&dir).unwrap();
    let metastore = Arc::new(Metastore::open(&dir.join("metastore.redb")).unwrap());
    let cluster = ClusterConfig {
        node_id: id,
        peers: peers.clone(),
        client: ClusterClient::new(TOKEN),
    };
    let replicated = start(&dir, metastore.clone(), &cluster).await.unwrap();
    let app = replicated.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Replica {
        id,
        metastore,
        replicated,
        server,
    }
}

async fn stop_replica(replica: Replica) {
    let Replica {
        id,
        metastore,
        replicated,
        server,
    } = replica;
    replicated.raft().shutdown().await.unwrap();
    drop(replicated);
    server.abort();
    let _ = server.await;
    // Raft's state-machine task lets go of the store shortly after.
    for _ in 0..100 {
        if Arc::strong_count(&metastore) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replica {id} still holds its metastore");
}

/// `n` replicas, numbered from 1, each in `dir/r{id}`, and their addresses.
async fn start_cluster(dir: &std::path::Path, n: u64) -> (Vec<Replica>, BTreeMap<NodeId, String>) {
    let (mut sockets, peers) = listeners(n).await;
    let mut replicas = Vec::new();
    for (i, listener) in sockets.drain(..).enumerate() {
        let id = i as NodeId + 1;
        replicas.push(start_replica(id, dir.join(format!("r{id}")), listener, &peers).await);
    }
    (replicas, peers)
}

async fn listeners(n: u64) -> (Vec<TcpListener>, BTreeMap<NodeId, String>) {
    let mut out = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, format!("http://{}", listener.local_addr().unwrap()));
        out.push(listener);
    }
    (out, peers)
}

/// The leader the replicas agree on, once they do.
async fn leader(replicas: &[&Replica]) -> NodeId {
    for _ in 0..200 {
        let seen: Vec<Option<NodeId>> = replicas
            .iter()
            .map(|r| r.replicated.raft().metrics().borrow().current_leader)
            .collect();
        if let Some(Some(id)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*id)) && replicas.iter().any(|r| r.id == *id) {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader agreed on");
}

async fn wait_for_blocks(replica: &Replica, ids: &[String]) {
    for _ in 0..200 {
        if ids.iter().all(|id| replica.metastore.knows_block(id)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !replica.metastore.knows_block(id))
        .collect();
    panic!("replica {} is missing {missing:?}", replica.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_acknowledged_by_the_cluster_survive_its_leader() {
    let dir = tempfile::tempdir().unwrap();
    let (mut replicas, peers) = start_cluster(dir.path(), 3).await;
    let first_leader = leader(&replicas.iter().collect::<Vec<_>>()).await;

    // Written through a follower: forwarded to the leader, applied by all.
    let follower = replicas.iter().find(|r| r.id != first_leader).unwrap();
    let blocks: Vec<BlockMeta> = (0..4).map(|i| ember_fixtures::level0_block(i, 4)).collect();
    let mut ids: Vec<String> = blocks.iter().map(|b| b.id.clone()).collect();
    follower.replicated.add_blocks(blocks).await.unwrap();
    // A role in another process that names a follower reaches the leader.
    let remote = RemoteMetastore::new(&peers[&follower.id], ClusterClient::new(TOKEN)).unwrap();
    let block = ember_fixtures::level0_block(5, 4);
    ids.push(block.id.clone());
    remote.add_blocks(vec![block]).await.unwrap();
    // A read on any replica after its barrier sees every acknowledged write.
    for r in &replicas {
        r.replicated
            .caught_up(Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            ids.iter().all(|id| r.metastore.knows_block(id)),
            "replica {}",
            r.id
        );
    }
    // A refusal is the state machine's answer, the same on every replica.
    let renew = RenewLease {
        job_id: "nope".into(),
        token: 1,
        now: 0,
        lease_nanos: 1,
    };
    let e = follower
        .replicated
        .apply(Kind::RenewLease(renew).into())
        .await
        .unwrap_err();
    assert!(matches!(e, MetastoreError::Lease { .. }), "{e}");
    let indexes: Vec<u64> = replicas
        .iter()
        .map(|r| r.metastore.applied_index().unwrap())
        .collect();
    assert!(indexes.iter().all(|i| *i == indexes[0]), "{indexes:?}");

    // The leader dies: the two left elect another and keep every block.
    let at = replicas.iter().position(|r| r.id == first_leader).unwrap();
    let old = replicas.remove(at);
    let old_dir = dir.path().join(format!("r{}", old.id));
    let old_addr = peers[&old.id].clone();
    stop_replica(old).await;
    let second_leader = leader(&replicas.iter().collect::<Vec<_>>()).await;
    assert_ne!(second_leader, first_leader);
    let more: Vec<BlockMeta> = (10..13)
        .map(|i| ember_fixtures::level0_block(i, 4))
        .collect();
    ids.extend(more.iter().map(|b| b.id.clone()));
    replicas[0].replicated.add_blocks(more).await.unwrap();
    for r in &replicas {
        wait_for_blocks(r, &ids).await;
        r.replicated
            .caught_up(Duration::from_secs(5))
            .await
            .unwrap();
    }

    // Back from its files, the old leader catches up on what it missed.
    let listener = TcpListener::bind(old_addr.trim_start_matches("http://"))
        .await
        .unwrap();
    let back = start_replica(first_leader, old_dir, listener, &peers).await;
    wait_for_blocks(&back, &ids).await;
    assert_eq!(
        back.metastore.entry_count(),
        replicas[0].metastore.entry_count()
    );
    replicas.push(back);
    for r in replicas {
        stop_replica(r).await;
    }
}

#[tokio::test]
async fn raft_calls_without_the_cluster_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sockets, peers) = listeners(1).await;
    let replica = start_replica(1, dir.path().join("r1"), sockets.remove(0), &peers).await;
    let client = reqwest_free_post(&peers[&1], "/ember.metastore.v1.Raft/Vote", "wrong").await;
    assert_eq!(client, 401);
    stop_replica(replica).await;
}

/// The status of a POST with `token` (and an empty JSON body).
async fn reqwest_free_post(base: &str, path: &str, token: &str) -> u16 {
    use http_body_util::Full;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = http::Request::post(format!("{base}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(axum::body::Bytes::from_static(b"{}")))
        .unwrap();
    client.request(request).await.unwrap().status().as_u16()
}

#[test]
fn peers_are_parsed_or_refused_with_the_reason() {
    let peers =
        ClusterConfig::parse_peers("1=http://10.0.0.1:4041, 2=http://10.0.0.2:4041/").unwrap();
    assert_eq!(peers[&2], "http://10.0.0.2:4041");
    for bad in [
        "",
        "1",
        "x=http://a:1",
        "1=ftp://a:1",
        "1=http://a:1,1=http://b:1",
    ] {
        assert!(ClusterConfig::parse_peers(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_behind_a_purged_log_gets_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut replicas, peers) = start_cluster(dir.path(), 3).await;
    let leader_id = leader(&replicas.iter().collect::<Vec<_>>()).await;
    let blocks: Vec<BlockMeta> = (0..3).map(|i| ember_fixtures::level0_block(i, 4)).collect();
    let mut ids: Vec<String> = blocks.iter().map(|b| b.id.clone()).collect();
    replicas[0].replicated.add_blocks(blocks).await.unwrap();
    for r in &replicas {
        wait_for_blocks(r, &ids).await;
    }

    // A follower is down while the others go on, snapshot and purge the
    // entries it lacks.
    let at = replicas.iter().position(|r| r.id != leader_id).unwrap();
    let down = replicas.remove(at);
    let (down_id, down_addr) = (down.id, peers[&down.id].clone());
    stop_replica(down).await;
    let leader = replicas.iter().find(|r| r.id == leader_id).unwrap();
    for i in 20..23 {
        let block = ember_fixtures::level0_block(i, 4);
        ids.push(block.id.clone());
        leader.replicated.add_blocks(vec![block]).await.unwrap();
    }
    let raft = leader.replicated.raft();
    raft.trigger().snapshot().await.unwrap();
    // (A metrics borrow held across an await would stall Raft's core.)
    let last_applied = raft.metrics().borrow().last_applied.unwrap().index;
    let snapshot = raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last_applied),
            "snapshot",
        )
        .await
        .unwrap()
        .snapshot
        .unwrap();
    raft.trigger().purge_log(snapshot.index).await.unwrap();
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= snapshot.index),
            "purged",
        )
        .await
        .unwrap();

    let down_dir = dir.path().join(format!("r{down_id}"));
    let listener = TcpListener::bind(down_addr.trim_start_matches("http://"))
        .await
        .unwrap();
    let back = start_replica(down_id, down_dir.clone(), listener, &peers).await;
    wait_for_blocks(&back, &ids).await;
    assert!(
        down_dir.join("raft-snapshot").exists(),
        "installed from the snapshot"
    );
    assert_eq!(
        back.metastore.applied_index().unwrap(),
        leader.metastore.applied_index().unwrap()
    );
    replicas.push(back);
    for r in replicas {
        stop_replica(r).await;
    }
}

/// A single replica leads itself at once, serves, and does so again after
/// a restart: it never waits on "not the leader" (Pyroscope v2's
/// single-node Raft could, grafana/pyroscope#5432).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_serves_alone_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r1");
    let mut ids = Vec::new();
    for round in 0..3usize {
        let (mut sockets, peers) = listeners(1).await;
        let replica = start_replica(1, path.clone(), sockets.remove(0), &peers).await;
        let block = ember_fixtures::level0_block(30 + round, 4);
        ids.push(block.id.clone());
        tokio::time::timeout(
            Duration::from_secs(5),
            replica.replicated.add_blocks(vec![block]),
        )
        .await
        .expect("a lone replica commits within seconds")
        .unwrap();
        wait_for_blocks(&replica, &ids).await;
        assert!(replica.replicated.is_leader());
        stop_replica(replica).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_are_added_and_removed_by_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sockets, all) = listeners(4).await;
    let first_three: BTreeMap<NodeId, String> = all
        .iter()
        .filter(|(id, _)| **id <= 3)
        .map(|(i, u)| (*i, u.clone()))
        .collect();
    let mut replicas = Vec::new();
    for (i, listener) in sockets.drain(..3).enumerate() {
        let id = i as NodeId + 1;
        replicas.push(
            start_replica(
                id,
                dir.path().join(format!("r{id}")),
                listener,
                &first_three,
            )
            .await,
        );
    }
    let leader_id = leader(&replicas.iter().collect::<Vec<_>>()).await;
    let block = ember_fixtures::level0_block(40, 4);
    let mut ids = vec![block.id.clone()];
    replicas[0]
        .replicated
        .add_blocks(vec![block])
        .await
        .unwrap();

    // A fourth replica starts knowing the others, and joins by a command.
    let fourth = start_replica(4, dir.path().join("r4"), sockets.remove(0), &all).await;
    let network = Network::new(ClusterClient::new(TOKEN));
    let members = network.members(&all[&2]).await.unwrap();
    assert_eq!(members.leader, Some(leader_id));
    assert_eq!(
        members.voters.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let add = MembersChange {
        add: BTreeMap::from([(4, all[&4].clone())]),
        remove: vec![],
    };
    let members = network
        .change_members(&all[&leader_id], &add)
        .await
        .unwrap();
    assert_eq!(
        members.voters.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    wait_for_blocks(&fourth, &ids).await;
    replicas.push(fourth);

    // A follower is removed; the cluster goes on without it.
    let gone = replicas
        .iter()
        .map(|r| r.id)
        .find(|id| *id != leader_id && *id != 4)
        .unwrap();
    let remove = MembersChange {
        add: BTreeMap::new(),
        remove: vec![gone],
    };
    let members = network
        .change_members(&all[&leader_id], &remove)
        .await
        .unwrap();
    assert!(!members.voters.contains_key(&gone), "{members:?}");
    assert_eq!(members.voters.len(), 3);
    // Changes go to the leader only.
    let follower = *members.voters.keys().find(|id| **id != leader_id).unwrap();
    assert!(network.change_members(&all[&follower], &add).await.is_err());
    let at = replicas.iter().position(|r| r.id == gone).unwrap();
    stop_replica(replicas.remove(at)).await;
    let block = ember_fixtures::level0_block(41, 4);
    ids.push(block.id.clone());
    replicas[0]
        .replicated
        .add_blocks(vec![block])
        .await
        .unwrap();
    for r in &replicas {
        wait_for_blocks(r, &ids).await;
    }
    for r in replicas {
        stop_replica(r).await;
    }
}

/// A leader's planner looks before it writes: once what can be planned
/// is, planning again adds nothing to the log (each flush's blocks wake
/// the planner, and a plan of nothing per flush was most of a busy log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_nothing_writes_nothing_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sockets, peers) = listeners(1).await;
    let replica = start_replica(1, dir.path().join("r1"), sockets.remove(0), &peers).await;
    let blocks: Vec<_> = (0..3)
        .map(|i| ember_fixtures::level0_block(40 + i, 4))
        .collect();
    replica.replicated.add_blocks(blocks).await.unwrap();
    let lifecycle = crate::Lifecycle::replicated(
        Arc::new(object_store::memory::InMemory::new()),
        replica.metastore.clone(),
        replica.replicated.clone(),
        crate::LifecycleConfig::default(),
    );
    let applied = || {
        let m = replica.replicated.raft().metrics().borrow().clone();
        m.last_applied.map(|l| l.index)
    };
    // The blocks are past their queues' age: planned by the first call.
    assert!(lifecycle.plan_once().await.unwrap() > 0);
    assert!(replica
        .metastore
        .job_waiting(ember_engine::profile::now_nanos(), None));
    let before = applied();
    for _ in 0..5 {
        assert_eq!(lifecycle.plan_once().await.unwrap(), 0);
    }
    assert_eq!(
        applied(),
        before,
        "plans of nothing were written to the log"
    );
    drop(lifecycle);
    stop_replica(replica).await;
}
