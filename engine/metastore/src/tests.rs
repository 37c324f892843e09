use super::*;
use ember_engine::block::SectionMeta;

const HOUR: i64 = 3600 * 1_000_000_000;

fn block(id: &str, datasets: Vec<DatasetMeta>) -> BlockMeta {
    BlockMeta {
        format_version: 1,
        id: id.into(),
        path: format!("segments/0/anonymous/{id}/block.bin"),
        shard: 0,
        compaction_level: 0,
        min_time: datasets.iter().map(|d| d.min_time).min().unwrap(),
        max_time: datasets.iter().map(|d| d.max_time).max().unwrap(),
        size: 1,
        datasets,
        sources: Vec::new(),
    }
}

fn dataset(tenant: &str, service: &str, min: i64, max: i64) -> DatasetMeta {
    DatasetMeta {
        tenant: tenant.into(),
        service_name: service.into(),
        min_time: min,
        max_time: max,
        profile_types: vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds".into()],
        series: vec![],
        sections: vec![SectionMeta::default()],
        profiles: 1,
        samples: 1,
    }
}

fn ids(refs: &[DatasetRef]) -> Vec<String> {
    let mut v: Vec<String> = refs
        .iter()
        .map(|r| format!("{}/{}", r.block_id, r.dataset.service_name))
        .collect();
    v.sort();
    v
}

#[test]
fn query_prunes_by_tenant_time_and_service_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metastore.redb");
    {
        let m = Metastore::open(&path).unwrap();
        m.apply(Command::add_block(block(
            "A",
            vec![
                dataset("t1", "api", HOUR, 2 * HOUR),
                dataset("t2", "api", HOUR, HOUR),
            ],
        )))
        .unwrap();
        // Spans two 6 h partitions.
        m.apply(Command::add_block(block(
            "B",
            vec![dataset("t1", "db", 5 * HOUR, 7 * HOUR)],
        )))
        .unwrap();
        m.apply(Command::add_block(block(
            "C",
            vec![dataset("t1", "api", 30 * HOUR, 30 * HOUR)],
        )))
        .unwrap();
        assert_eq!(m.applied_index().unwrap(), 3);
    }
    let m = Metastore::open(&path).unwrap();
    let q = |start, end, services: Option<Vec<&str>>| BlockQuery {
        tenant: "t1".into(),
        start,
        end,
        service_names: services.map(|s| s.into_iter().map(String::from).collect()),
        profile_types: None,
        skip_level0: false,
    };
    assert_eq!(
        ids(&m.query(&q(0, 100 * HOUR, None))),
        ["A/api", "B/db", "C/api"]
    );
    assert_eq!(ids(&m.query(&q(0, 3 * HOUR, None))), ["A/api"]);
    assert_eq!(ids(&m.query(&q(6 * HOUR + 1, 8 * HOUR, None))), ["B/db"]);
    assert_eq!(
        ids(&m.query(&q(0, 100 * HOUR, Some(vec!["api"])))),
        ["A/api", "C/api"]
    );
    let t2 = BlockQuery {
        tenant: "t2".into(),
        start: 0,
        end: 100 * HOUR,
        ..Default::default()
    };
    assert_eq!(ids(&m.query(&t2)), ["A/api"]);
    assert!(m.query(&q(50 * HOUR, 60 * HOUR, None)).is_empty());
    assert_eq!(m.query(&q(i64::MIN, i64::MAX, None)).len(), 3);
    assert_eq!(m.applied_index().unwrap(), 3);
}

#[test]
fn snapshot_restores_into_another_store() {
    let dir = tempfile::tempdir().unwrap();
    let a = Metastore::open(&dir.path().join("a.redb")).unwrap();
    a.apply(Command::add_block(block(
        "A",
        vec![dataset("t", "s", HOUR, HOUR)],
    )))
    .unwrap();
    let b = Metastore::open(&dir.path().join("b.redb")).unwrap();
    b.apply(Command::add_block(block(
        "X",
        vec![dataset("t", "s", HOUR, HOUR)],
    )))
    .unwrap();
    b.restore(&a.snapshot().unwrap()).unwrap();
    let all = BlockQuery {
        tenant: "t".into(),
        start: 0,
        end: 10 * HOUR,
        ..Default::default()
    };
    assert_eq!(ids(&b.query(&all)), ["A/s"]);
    assert_eq!(b.applied_index().unwrap(), 1);
}

#[test]
fn negative_and_far_times_keep_key_order() {
    assert!(entry_key(-PARTITION_NANOS, "t", 0, "a") < entry_key(0, "t", 0, "a"));
    assert_eq!(
        partition_from_key(&entry_key(-PARTITION_NANOS, "t", 0, "a")),
        Some(-PARTITION_NANOS)
    );
}

#[test]
fn a_block_registered_twice_is_one_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    let b = block("A", vec![dataset("t", "s", HOUR, HOUR)]);
    let all = BlockQuery {
        tenant: "t".into(),
        start: 0,
        end: 10 * HOUR,
        ..Default::default()
    };
    {
        let m = Metastore::open(&path).unwrap();
        m.apply(Command::add_block(b.clone())).unwrap();
        m.apply(Command::add_block(b.clone())).unwrap();
        m.apply_all(vec![
            Command::add_block(b.clone()),
            Command::add_block(b.clone()),
        ])
        .unwrap();
        assert_eq!(ids(&m.query(&all)), ["A/s"]);
        assert_eq!(m.entry_count(), 1);
    }
    let m = Metastore::open(&path).unwrap();
    m.apply(Command::add_block(b)).unwrap();
    assert_eq!(ids(&m.query(&all)), ["A/s"]);
    assert_eq!(m.entry_count(), 1);
}

#[test]
fn a_block_spanning_years_is_refused_and_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    let year = 365 * 24 * HOUR;
    let wide = block(
        "W",
        vec![dataset("t", "s", 0, year), dataset("t", "s2", HOUR, HOUR)],
    );
    let err = m.apply(Command::add_block(wide)).unwrap_err().to_string();
    assert!(err.contains("spans 1461 partitions"), "{err}");
    assert_eq!(m.entry_count(), 0);
    // Four partitions is the most a block may cost.
    let edge = block("E", vec![dataset("t", "s", 0, 4 * PARTITION_NANOS - 1)]);
    m.apply(Command::add_block(edge)).unwrap();
    assert_eq!(m.entry_count(), 4);
    let over = block("O", vec![dataset("t", "s", 0, 4 * PARTITION_NANOS)]);
    assert!(m.apply(Command::add_block(over)).is_err());
}

#[test]
fn rejects_empty_command() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    assert!(m.apply(Command { kind: None }).is_err());
}

fn rules(max_blocks: u32, max_age_nanos: i64) -> PlanCompaction {
    PlanCompaction {
        now: 0,
        levels: vec![
            LevelRule {
                max_blocks,
                max_age_nanos,
            },
            LevelRule {
                max_blocks,
                max_age_nanos,
            },
        ],
        max_jobs: 100,
    }
}

fn plan(m: &Metastore, now: i64, max_blocks: u32) -> usize {
    let cmd = PlanCompaction {
        now,
        ..rules(max_blocks, 1000 * HOUR)
    };
    match m.apply(command::Kind::PlanCompaction(cmd).into()).unwrap() {
        Applied::Planned(n) => n,
        other => panic!("{other:?}"),
    }
}

fn lease(m: &Metastore, worker: &str, now: i64) -> Option<Job> {
    lease_up_to(m, worker, now, None)
}

fn lease_up_to(m: &Metastore, worker: &str, now: i64, max_level: Option<u32>) -> Option<Job> {
    let cmd = LeaseJob {
        worker: worker.into(),
        now,
        lease_nanos: 15_000_000_000,
        max_level,
    };
    match m.apply(command::Kind::LeaseJob(cmd).into()).unwrap() {
        Applied::Leased(j) => j,
        other => panic!("{other:?}"),
    }
}

fn output(id: &str, tenant: &str, level: u32) -> BlockMeta {
    BlockMeta {
        compaction_level: level,
        path: format!("blocks/0/{tenant}/{id}/block.bin"),
        ..block(id, vec![dataset(tenant, "api", HOUR, 2 * HOUR)])
    }
}

fn commit(m: &Metastore, job: &Job, out: Option<BlockMeta>) -> Result<Applied, MetastoreError> {
    m.apply(
        command::Kind::CommitJob(CommitJob {
            job_id: job.id.clone(),
            token: job.lease_token,
            output: out,
            delete_after: 100,
        })
        .into(),
    )
}

fn tenant_query(tenant: &str) -> BlockQuery {
    BlockQuery {
        tenant: tenant.into(),
        start: 0,
        end: 10 * HOUR,
        ..Default::default()
    }
}

#[test]
fn jobs_stay_within_tenant_shard_level_and_partition() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    // Two tenants share every block; block D is in another partition.
    for id in ["A", "B", "C"] {
        m.apply(Command::add_block(block(
            id,
            vec![
                dataset("t1", "api", HOUR, HOUR),
                dataset("t2", "api", HOUR, HOUR),
            ],
        )))
        .unwrap();
    }
    m.apply(Command::add_block(block(
        "D",
        vec![dataset("t1", "api", 7 * HOUR, 7 * HOUR)],
    )))
    .unwrap();
    // 3 blocks per job: only (t1, p0) and (t2, p0) are full.
    assert_eq!(plan(&m, 0, 3), 2);
    let jobs = m.jobs();
    let mut shapes: Vec<(String, usize)> = jobs
        .iter()
        .map(|j| (j.tenant.clone(), j.sources.len()))
        .collect();
    shapes.sort();
    assert_eq!(shapes, [("t1".into(), 3), ("t2".into(), 3)]);
    for j in &jobs {
        assert!(j
            .sources
            .iter()
            .all(|s| s.datasets.iter().all(|d| d.tenant == j.tenant)));
    }
    // Planning again adds nothing: the blocks are taken.
    assert_eq!(plan(&m, 0, 3), 0);
    // D alone goes once it has aged (its id is no ULID: its time counts).
    assert_eq!(plan(&m, 7 * HOUR + 1000 * HOUR, 3), 1);
}

#[test]
fn activity_changes_when_work_may_wait_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    let mut activity = m.activity();
    assert!(!activity.has_changed().unwrap());
    for id in ["A", "B"] {
        m.apply(Command::add_block(block(
            id,
            vec![dataset("t", "api", HOUR, HOUR)],
        )))
        .unwrap();
    }
    assert!(activity.has_changed().unwrap(), "blocks added");
    activity.mark_unchanged();
    // A plan that finds nothing ready, and a lease that finds nothing,
    // must not wake the planner and the workers into a loop.
    assert_eq!(plan(&m, 0, 3), 0);
    assert!(lease(&m, "w", 0).is_none());
    assert!(!activity.has_changed().unwrap());
    assert_eq!(plan(&m, 0, 2), 1);
    assert!(activity.has_changed().unwrap(), "job planned");
    activity.mark_unchanged();
    let job = lease(&m, "w", 0).unwrap();
    assert!(!activity.has_changed().unwrap());
    commit(&m, &job, Some(output("O", "t", 1))).unwrap();
    assert!(activity.has_changed().unwrap(), "job committed");
}

#[test]
fn commit_swaps_sources_for_output_and_tombstones_only_unshared_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    let m = Metastore::open(&path).unwrap();
    for id in ["A", "B"] {
        m.apply(Command::add_block(block(
            id,
            vec![
                dataset("t1", "api", HOUR, 2 * HOUR),
                dataset("t2", "api", HOUR, HOUR),
            ],
        )))
        .unwrap();
    }
    assert_eq!(plan(&m, 0, 2), 2);
    let j1 = lease(&m, "w", 0).unwrap();
    let t1_first = j1.tenant.clone();
    commit(&m, &j1, Some(output("OUT1", &t1_first, 1))).unwrap();
    // The other tenant still reads A and B: nothing is retired yet.
    assert_eq!(m.tombstone_count(), 0);
    let other = if t1_first == "t1" { "t2" } else { "t1" };
    assert_eq!(ids(&m.query(&tenant_query(other))), ["A/api", "B/api"]);
    assert_eq!(ids(&m.query(&tenant_query(&t1_first))), ["OUT1/api"]);
    let j2 = lease(&m, "w", 0).unwrap();
    commit(&m, &j2, Some(output("OUT2", other, 1))).unwrap();
    assert_eq!(m.tombstone_count(), 2);
    assert_eq!(m.due_tombstones(99).len(), 0);
    assert_eq!(m.due_tombstones(100).len(), 2);
    assert!(m.jobs().is_empty());
    // A retired block registered again (a late dlq retry) stays retired.
    m.apply(Command::add_block(block(
        "A",
        vec![dataset("t1", "api", HOUR, HOUR)],
    )))
    .unwrap();
    assert_eq!(ids(&m.query(&tenant_query("t1"))).len(), 1);
    // Everything survives a restart, and level filtering works.
    drop(m);
    let m = Metastore::open(&path).unwrap();
    assert_eq!(ids(&m.query(&tenant_query("t1"))).len(), 1);
    assert_eq!(m.tombstone_count(), 2);
    let skip = BlockQuery {
        skip_level0: true,
        ..tenant_query("t1")
    };
    assert_eq!(m.query(&skip).len(), 1);
    let paths = m.due_tombstones(100).into_iter().map(|t| t.path).collect();
    m.apply(command::Kind::RemoveTombstones(RemoveTombstones { paths }).into())
        .unwrap();
    assert_eq!(m.tombstone_count(), 0);
    assert_eq!(m.blocks_by_level(), BTreeMap::from([(1, 2)]));
}

#[test]
fn leases_fence_stale_workers_and_failing_jobs_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    for id in ["A", "B"] {
        m.apply(Command::add_block(block(
            id,
            vec![dataset("t", "api", HOUR, HOUR)],
        )))
        .unwrap();
    }
    assert_eq!(plan(&m, 0, 2), 1);
    let first = lease(&m, "w1", 0).unwrap();
    assert!(lease(&m, "w2", 1).is_none(), "leased twice");
    // w1's lease expires; w2 takes over with a new token.
    let second = lease(&m, "w2", 16_000_000_000).unwrap();
    assert!(second.lease_token > first.lease_token);
    assert_eq!(second.failures, 1);
    let err = commit(&m, &first, Some(output("X", "t", 1))).unwrap_err();
    assert!(matches!(err, MetastoreError::Lease { .. }), "{err}");
    let renew = |job: &Job| {
        m.apply(
            command::Kind::RenewLease(RenewLease {
                job_id: job.id.clone(),
                token: job.lease_token,
                now: 20_000_000_000,
                lease_nanos: 15_000_000_000,
            })
            .into(),
        )
    };
    assert!(renew(&first).is_err());
    renew(&second).unwrap();
    let fail = |job: &Job| {
        m.apply(
            command::Kind::FailJob(FailJob {
                job_id: job.id.clone(),
                token: job.lease_token,
                error: "boom".into(),
            })
            .into(),
        )
        .unwrap()
    };
    fail(&second);
    let third = lease(&m, "w3", 21_000_000_000).unwrap();
    assert_eq!(third.failures, 2);
    fail(&third);
    assert!(lease(&m, "w4", 22_000_000_000).is_none());
    let jobs = m.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].status(), JobStatus::Failed);
    assert_eq!(jobs[0].last_error, "boom");
    // Set aside, its blocks are not planned again, and queries still read them.
    assert_eq!(plan(&m, 0, 2), 0);
    assert_eq!(m.query(&tenant_query("t")).len(), 2);
}

#[test]
fn a_level0_worker_leaves_higher_levels_and_an_expired_lease_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    // The level-1 job is the smaller: any worker would take it first.
    for (id, level, size) in [("A", 0, 5), ("B", 0, 5), ("C", 1, 1), ("D", 1, 1)] {
        m.apply(Command::add_block(BlockMeta {
            compaction_level: level,
            size,
            ..block(id, vec![dataset("t", "api", HOUR, HOUR)])
        }))
        .unwrap();
    }
    assert_eq!(plan(&m, 0, 2), 2);
    let l0 = lease_up_to(&m, "lane", 0, Some(0)).unwrap();
    assert_eq!(l0.level, 0);
    assert!(lease_up_to(&m, "lane", 0, Some(0)).is_none());
    let l1 = lease(&m, "any", 0).unwrap();
    assert_eq!(l1.level, 1);
    // Both leases expire. The level-1 job is counted failed once,
    // however many leases find it expired before a worker takes it.
    let again = lease_up_to(&m, "lane", 16_000_000_000, Some(0)).unwrap();
    assert_eq!((again.level, again.failures), (0, 1));
    assert!(lease_up_to(&m, "lane", 17_000_000_000, Some(0)).is_none());
    assert!(lease_up_to(&m, "lane", 18_000_000_000, Some(0)).is_none());
    let l1 = lease(&m, "any", 19_000_000_000).unwrap();
    assert_eq!((l1.level, l1.failures), (1, 1));
}

#[test]
fn snapshot_carries_jobs_and_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let a = Metastore::open(&dir.path().join("a.redb")).unwrap();
    for id in ["A", "B", "C", "D"] {
        a.apply(Command::add_block(block(
            id,
            vec![dataset("t", "api", HOUR, HOUR)],
        )))
        .unwrap();
    }
    assert_eq!(plan(&a, 0, 2), 2);
    let j = lease(&a, "w", 0).unwrap();
    commit(&a, &j, Some(output("OUT", "t", 1))).unwrap();
    let b = Metastore::open(&dir.path().join("b.redb")).unwrap();
    b.restore(&a.snapshot().unwrap()).unwrap();
    assert_eq!(b.jobs(), a.jobs());
    assert_eq!(b.tombstone_count(), 2);
    assert_eq!(
        ids(&b.query(&tenant_query("t"))),
        ids(&a.query(&tenant_query("t")))
    );
    assert_eq!(b.applied_index().unwrap(), a.applied_index().unwrap());
}

#[test]
fn retention_drops_whole_expired_partitions_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    let day = 24 * HOUR;
    // Old: partition 0 for both tenants in one block; new: day 3.
    m.apply(Command::add_block(block(
        "OLD",
        vec![
            dataset("short", "api", HOUR, HOUR),
            dataset("long", "api", HOUR, HOUR),
        ],
    )))
    .unwrap();
    m.apply(Command::add_block(block(
        "NEW",
        vec![dataset("short", "api", 3 * day, 3 * day)],
    )))
    .unwrap();
    let retention = |now| {
        m.apply(
            command::Kind::ApplyRetention(ApplyRetention {
                now,
                default_nanos: 0,
                tenants: vec![TenantRetention {
                    tenant: "short".into(),
                    retention_nanos: day,
                }],
                delete_after: 7,
            })
            .into(),
        )
        .unwrap()
    };
    // Partition 0 ends at 6 h: at 6 h + 1 day it has just expired.
    assert_eq!(retention(PARTITION_NANOS + day - 1), Applied::Expired(0));
    assert_eq!(retention(PARTITION_NANOS + day), Applied::Expired(1));
    let all = |tenant: &str| BlockQuery {
        tenant: tenant.into(),
        start: 0,
        end: 10 * day,
        ..Default::default()
    };
    assert_eq!(ids(&m.query(&all("short"))), ["NEW/api"]);
    // "long" keeps everything, so the shared object stays.
    assert_eq!(ids(&m.query(&all("long"))), ["OLD/api"]);
    assert_eq!(m.tombstone_count(), 0);
    // Once "long" has a retention too, the object is retired.
    m.apply(
        command::Kind::ApplyRetention(ApplyRetention {
            now: 10 * day,
            default_nanos: day,
            tenants: vec![],
            delete_after: 7,
        })
        .into(),
    )
    .unwrap();
    assert!(m.query(&all("long")).is_empty());
    assert_eq!(m.tombstone_count(), 2);
}

#[test]
fn a_log_entry_s_position_is_stored_with_what_it_did_and_travels_in_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    assert_eq!(m.log_position().unwrap(), None);
    let b = block("b1", vec![dataset("t", "api", 0, HOUR)]);
    m.add_blocks_entry(vec![b.clone()], b"1").unwrap();
    assert_eq!(m.log_position().unwrap().as_deref(), Some(&b"1"[..]));
    // Known already: nothing written but the position.
    m.add_blocks_entry(vec![b], b"2").unwrap();
    assert_eq!(m.log_position().unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(m.entry_count(), 1);
    // Refused the same way on every replica: the position moves.
    let renew = RenewLease {
        job_id: "nope".into(),
        token: 1,
        now: 0,
        lease_nanos: 1,
    };
    let e = m
        .apply_entry(command::Kind::RenewLease(renew).into(), b"3")
        .unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert_eq!(m.log_position().unwrap().as_deref(), Some(&b"3"[..]));
    m.record_entry(b"4").unwrap();
    let snapshot = m.snapshot().unwrap();

    let other = Metastore::open(&dir.path().join("o.redb")).unwrap();
    other.restore(&snapshot).unwrap();
    assert_eq!(other.log_position().unwrap().as_deref(), Some(&b"4"[..]));
    assert_eq!(other.entry_count(), 1);
    assert_eq!(other.applied_index().unwrap(), m.applied_index().unwrap());
    drop(m);
    let reopened = Metastore::open(&dir.path().join("m.redb")).unwrap();
    assert_eq!(reopened.log_position().unwrap().as_deref(), Some(&b"4"[..]));
}

#[test]
fn instances_hold_while_their_lease_does_and_survive_restarts_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    let m = Metastore::open(&path).unwrap();
    let register = |id: &str, roles: &[&str], expires: i64, now: i64| {
        Command::from(command::Kind::RegisterInstance(RegisterInstance {
            instance: Some(Instance {
                id: id.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                address: format!("{id}:4040"),
                lease_expires: expires,
            }),
            now,
        }))
    };
    m.apply(register("a", &["distributor", "segment-writer"], 15, 0))
        .unwrap();
    m.apply(register("b", &["query-frontend"], 15, 0)).unwrap();
    let ids = |at: i64, m: &Metastore| -> Vec<String> {
        m.live_instances(at).into_iter().map(|i| i.id).collect()
    };
    assert_eq!(ids(10, &m), ["a", "b"]);
    // `b` stops renewing; `a` renews.
    m.apply(register("a", &["distributor", "segment-writer"], 30, 10))
        .unwrap();
    assert_eq!(ids(20, &m), ["a"]);
    assert_eq!(m.live_instances(20)[0].roles.len(), 2);

    drop(m);
    let m = Metastore::open(&path).unwrap();
    assert_eq!(ids(20, &m), ["a"]);
    let other = Metastore::open(&dir.path().join("other.redb")).unwrap();
    other.restore(&m.snapshot().unwrap()).unwrap();
    assert_eq!(ids(20, &other), ["a"]);

    // An hour after its lease ended, `b` is forgotten: the table does not
    // grow with every process that ever started.
    m.apply(register("a", &["distributor"], HOUR + 100, HOUR + 50))
        .unwrap();
    assert_eq!(m.read_index().instances.len(), 1);

    for bad in [
        register("", &["distributor"], 1, 0),
        register(&"x".repeat(300), &["distributor"], 1, 0),
        register("c", &["r"; 17], 1, 0),
        Command::from(command::Kind::RegisterInstance(RegisterInstance::default())),
    ] {
        let e = m.apply(bad).unwrap_err();
        assert!(matches!(e, MetastoreError::InvalidCommand(_)), "{e}");
    }
}

/// The looks a planner and a worker take before writing a command answer
/// as the command would: a plan of nothing and a lease of nothing never
/// reach the (replicated) log, and no job is missed.
#[test]
fn a_look_before_planning_or_leasing_answers_as_the_command_would() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
    let rules_at = |now| PlanCompaction {
        now,
        ..rules(3, 1000 * HOUR)
    };
    let agree_on_plan = |now| {
        let look = m.would_plan(&rules_at(now));
        assert_eq!(look, plan(&m, now, 3) > 0, "at {now}");
        look
    };
    // Two blocks of three: nothing to plan until the third, or until the
    // queue's age passes.
    for id in ["A", "B"] {
        m.apply(Command::add_block(block(
            id,
            vec![dataset("t", "api", HOUR, HOUR)],
        )))
        .unwrap();
        assert!(!agree_on_plan(0));
    }
    assert!(!m.job_waiting(0, None));
    assert!(agree_on_plan(2000 * HOUR), "an old queue is planned");
    assert!(!agree_on_plan(2000 * HOUR), "and only once");

    // A waiting job, for any worker; leased, it waits no more until its
    // lease expires.
    assert!(m.job_waiting(0, Some(0)));
    assert!(m.job_waiting(0, None));
    let job = lease_up_to(&m, "w", 0, None).unwrap();
    assert!(!m.job_waiting(0, None));
    assert_eq!(lease(&m, "w2", 0), None);
    let expiry = job.lease_expires;
    assert!(m.job_waiting(expiry, None), "an expired lease waits again");
    assert!(lease(&m, "w2", expiry).is_some());
    assert!(!m.job_waiting(expiry, None));
}
