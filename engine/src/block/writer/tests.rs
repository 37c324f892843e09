use super::*;
use crate::block::schema::row_group_rows;
use parquet::file::metadata::ParquetMetaDataReader;

/// One tenant's single profile of service `api`, a sample per stack.
fn api_profile(time_nanos: i64, functions: Functions, stacks: Vec<Vec<u32>>) -> Profile {
    let (stacks, samples) = Stacks::with_samples(stacks.into_iter().map(|st| (st, 3, None)));
    Profile {
        tenant: "t".into(),
        labels: vec![("service_name".into(), "api".into())],
        profile_type: "cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
        time_nanos,
        duration_nanos: 0,
        period: 0,
        functions: Arc::new(functions),
        stacks,
        samples,
    }
}

/// The Parquet footer of the first dataset's `section`.
fn section_footer(
    block: &EncodedBlock,
    section: Section,
) -> parquet::file::metadata::ParquetMetaData {
    let meta = block.meta.datasets[0].section(section).unwrap();
    let bytes = block
        .bytes
        .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
    ParquetMetaDataReader::new()
        .parse_and_finish(&bytes)
        .unwrap()
}

#[test]
fn large_sections_are_cut_into_bounded_row_groups() {
    let n = 2 * row_group_rows(0) + 1000;
    let profile = api_profile(
        1,
        (0..n).map(|i| format!("f{i}")).collect(),
        (0..n as u32).map(|i| vec![i]).collect(),
    );
    let block = write_block(&[profile], 0, &mut StackNodes::default()).unwrap();
    for section in [Section::Samples, Section::Stacks] {
        let rows_written = block.meta.datasets[0].section(section).unwrap().rows;
        let footer = section_footer(&block, section);
        let rows: Vec<i64> = footer.row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(rows.iter().sum::<i64>(), rows_written as i64, "{section:?}");
        assert_eq!(rows.len(), 3, "{section:?}: {rows:?}");
        assert!(rows.iter().all(|&r| r <= row_group_rows(0) as i64));
        // Level 0 is LZ4 throughout: compaction opens every column chunk.
        for group in footer.row_groups() {
            for column in group.columns() {
                assert_eq!(column.compression(), parquet::basic::Compression::LZ4_RAW);
            }
        }
    }
}

/// Level 0 skips the dictionaries and statistics that would cost more
/// to write than they save in a block that lives a minute; what
/// queries prune by keeps its own.
#[test]
fn level_0_samples_keep_the_statistics_worth_their_cost() {
    let functions = ["main", "a"].into_iter().collect();
    let profile = api_profile(7, functions, vec![vec![0], vec![0, 1]]);
    let block = write_block(&[profile], 0, &mut StackNodes::default()).unwrap();
    let footer = section_footer(&block, Section::Samples);
    let group = &footer.row_groups()[0];
    let column = |name: &str| {
        group
            .columns()
            .iter()
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    for name in [
        "time",
        "profile_type_key",
        "series_key",
        "stack_id",
        "value",
        "span_id",
    ] {
        assert!(column(name).dictionary_page_offset().is_none(), "{name}");
    }
    for name in ["profile_type_key", "series_key", "stack_id", "value"] {
        assert!(column(name).statistics().is_none(), "{name}");
    }
    let spans = column("span_id").statistics().expect("span_id");
    assert_eq!(spans.null_count_opt(), Some(2));
    assert!(column("time").statistics().is_some());
}

/// Every sample row names its own profile's service, type and series,
/// read back as the plain strings the section's schema declares.
#[test]
fn sample_rows_carry_their_profiles_strings() {
    use arrow::array::AsArray;
    let functions: Arc<Functions> = Arc::new(["main", "a", "b"].into_iter().collect());
    let profile = |ty: &str, pod: &str, time_nanos: i64, samples: usize| {
        let (stacks, samples) =
            Stacks::with_samples((0..samples).map(|i| ([0, i as u32 % 3], 1, None)));
        Profile {
            tenant: "t".into(),
            labels: vec![
                ("pod".into(), pod.into()),
                ("service_name".into(), "api".into()),
            ],
            profile_type: ty.into(),
            time_nanos,
            duration_nanos: 0,
            period: 0,
            functions: functions.clone(),
            stacks,
            samples,
        }
    };
    let profiles = vec![
        profile("b:b:b:b:b", "p1", 2, 3),
        profile("a:a:a:a:a", "p2", 1, 2),
        profile("a:a:a:a:a", "p1", 5, 1),
        profile("a:a:a:a:a", "p1", 4, 4),
    ];
    let mut want: Vec<(String, String, String)> = Vec::new();
    let mut sorted: Vec<&Profile> = profiles.iter().collect();
    sorted.sort_by_key(|p| (&p.profile_type, labels_to_string(&p.labels), p.time_nanos));
    for p in sorted {
        let row = (
            "api".to_string(),
            p.profile_type.clone(),
            labels_to_string(&p.labels),
        );
        want.extend(std::iter::repeat_n(row, p.samples.len()));
    }
    let block = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
    let mut got = Vec::new();
    for b in section_batches(&block, Section::Samples) {
        assert_eq!(b.schema(), Section::Samples.schema());
        let column = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
        let (service, ty, labels) = (
            column("service_name"),
            column("profile_type"),
            column("labels"),
        );
        for i in 0..b.num_rows() {
            got.push((
                service.value(i).to_string(),
                ty.value(i).to_string(),
                labels.value(i).to_string(),
            ));
        }
    }
    assert_eq!(got, want);
}

fn section_batches(block: &EncodedBlock, section: Section) -> Vec<RecordBatch> {
    dataset_batches(block, 0, section)
}

/// The rows of a dataset's section, samples with their strings.
fn dataset_batches(block: &EncodedBlock, dataset: usize, section: Section) -> Vec<RecordBatch> {
    let dataset = &block.meta.datasets[dataset];
    let meta = dataset.section(section).unwrap();
    let bytes = block
        .bytes
        .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
    let batches = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(meta.keyed, section == Section::Samples);
    if !meta.keyed {
        return batches;
    }
    let strings = crate::block::DatasetStrings::of(dataset);
    batches
        .iter()
        .map(|b| {
            assert_eq!(b.schema(), keyed_samples_schema());
            strings.samples(b).unwrap()
        })
        .collect()
}

/// Stacks given in any order, by profiles that share a function table
/// or not, get the nodes that their paths' names make.
#[test]
fn stack_nodes_are_the_paths_of_every_stack_whatever_their_order() {
    use arrow::array::AsArray;
    use arrow::datatypes::UInt64Type;
    let shared: Arc<Functions> = Arc::new(["main", "a", "b", "c", "d"].into_iter().collect());
    // The same indices mean other names in another table.
    let other: Arc<Functions> = Arc::new(["main", "d", "c", "b", "a"].into_iter().collect());
    let profile = |ty: &str, functions: &Arc<Functions>, stacks: &[&[u32]]| {
        let (stacks, samples) = Stacks::with_samples(stacks.iter().map(|st| (st, 1, None)));
        Profile {
            tenant: "t".into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: ty.into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 0,
            functions: functions.clone(),
            stacks,
            samples,
        }
    };
    let stacks: &[&[u32]] = &[
        &[0, 1, 2],
        &[0, 1, 3],
        &[0, 4],
        &[0, 1],
        &[0, 1, 2, 3],
        &[0, 2],
    ];
    let unsorted: &[&[u32]] = &[&[0, 4, 1], &[0, 1, 2], &[0, 4], &[0, 1, 2, 3]];
    let profiles = vec![
        profile("a:a:a:a:a", &shared, stacks),
        profile("b:b:b:b:b", &shared, unsorted),
        profile("c:c:c:c:c", &other, stacks),
    ];
    let mut want = std::collections::BTreeMap::new();
    for p in &profiles {
        for s in &p.samples {
            let mut parent = stack::ROOT;
            for &f in p.stack(s) {
                let name = p.functions.get(f as usize).unwrap().to_string();
                let id = stack::node_id(parent, &name);
                want.insert(id, (parent, name));
                parent = id;
            }
        }
    }
    let block = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
    let mut got = std::collections::BTreeMap::new();
    for b in section_batches(&block, Section::Stacks) {
        let ids = b.column(0).as_primitive::<UInt64Type>();
        let parents = b.column(1).as_primitive::<UInt64Type>();
        let names = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            got.insert(ids.value(i), (parents.value(i), names.value(i).to_string()));
        }
    }
    assert_eq!(got, want);
    // Every sample points at its own leaf.
    let leaves: std::collections::BTreeSet<u64> = section_batches(&block, Section::Samples)
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name("stack_id")
                .unwrap()
                .as_primitive::<UInt64Type>();
            col.values().to_vec()
        })
        .collect();
    let leaf = |f: &Functions, st: &[u32]| {
        st.iter().fold(stack::ROOT, |p, &i| {
            stack::node_id(p, f.get(i as usize).unwrap())
        })
    };
    let mut want_leaves = std::collections::BTreeSet::new();
    for p in &profiles {
        for s in &p.samples {
            want_leaves.insert(leaf(&p.functions, p.stack(s)));
        }
    }
    assert_eq!(leaves, want_leaves);
}

/// Distinct stacks side by side in one buffer, ranked in the order
/// given, as `normalise` makes a pprof's.
fn ranked_stacks(stacks: &[&[u32]]) -> (Arc<Stacks>, Vec<Stack>) {
    let frames = Arc::new(Stacks::from_frames(stacks.concat()));
    let mut start = 0;
    let ranked = stacks
        .iter()
        .enumerate()
        .map(|(rank, st)| {
            let stack = Stack::ranked(start..start + st.len(), rank as u32);
            start += st.len();
            stack
        })
        .collect();
    (frames, ranked)
}

/// Profiles of one pprof share its ranked stacks, and a stack walked
/// for one is not walked for the next: the block must be what the same
/// stacks unranked make, whichever profile walks a stack first, and a
/// second buffer under the same function table (its ranks mean other
/// stacks) must not read the first one's ids.
#[test]
fn ranked_stacks_make_the_block_their_frames_make() {
    let functions: Arc<Functions> = Arc::new(["main", "a", "b", "c"].into_iter().collect());
    let (in_first, first) = ranked_stacks(&[&[0, 1], &[0, 1, 2], &[0, 3]]);
    let (in_second, second) = ranked_stacks(&[&[0, 3, 1], &[0, 2]]);
    let profile = |ty: &str, pod: &str, (buffer, stacks): (&Arc<Stacks>, Vec<Stack>)| Profile {
        tenant: "t".into(),
        labels: vec![
            ("pod".into(), pod.into()),
            ("service_name".into(), "api".into()),
        ],
        profile_type: ty.into(),
        time_nanos: 1,
        duration_nanos: 0,
        period: 0,
        functions: functions.clone(),
        stacks: buffer.clone(),
        samples: stacks
            .into_iter()
            .enumerate()
            .map(|(i, stack)| crate::profile::Sample {
                stack,
                value: i as i64 + 1,
                span_id: None,
            })
            .collect(),
    };
    let ranked = vec![
        profile("a:a:a:a:a", "p1", (&in_first, vec![first[2], first[0]])),
        profile("b:b:b:b:b", "p1", (&in_first, first.clone())),
        profile("b:b:b:b:b", "p2", (&in_second, second.clone())),
        profile("c:c:c:c:c", "p1", (&in_first, vec![first[1], first[2]])),
    ];
    let unranked: Vec<Profile> = ranked
        .iter()
        .map(|p| {
            let (stacks, samples) =
                Stacks::with_samples(p.samples.iter().map(|s| (p.stack(s), s.value, s.span_id)));
            Profile {
                stacks,
                samples,
                ..p.clone()
            }
        })
        .collect();
    assert!(unranked[1].samples[0].stack.rank().is_none());
    let want = dataset_rows(
        &write_block(&unranked, 0, &mut StackNodes::default()).unwrap(),
        0,
    );
    let mut nodes = StackNodes::default();
    for write in ["cold", "warm"] {
        let got = dataset_rows(&write_block(&ranked, 0, &mut nodes).unwrap(), 0);
        assert_eq!(got, want, "{write}");
    }
}

/// A dataset's stack nodes as (id, parent, name), and its samples as
/// (series, stack id, value) in the order written.
type Rows = (
    std::collections::BTreeSet<(u64, u64, String)>,
    Vec<(String, u64, i64)>,
);

fn dataset_rows(block: &EncodedBlock, dataset: usize) -> Rows {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int64Type, UInt64Type};
    let mut nodes = std::collections::BTreeSet::new();
    for b in dataset_batches(block, dataset, Section::Stacks) {
        let ids = b.column(0).as_primitive::<UInt64Type>();
        let parents = b.column(1).as_primitive::<UInt64Type>();
        let names = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            nodes.insert((ids.value(i), parents.value(i), names.value(i).to_string()));
        }
    }
    let mut samples = Vec::new();
    for b in dataset_batches(block, dataset, Section::Samples) {
        let series = b.column_by_name("labels").unwrap().as_string::<i32>();
        let ids = b
            .column_by_name("stack_id")
            .unwrap()
            .as_primitive::<UInt64Type>();
        let values = b
            .column_by_name("value")
            .unwrap()
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            samples.push((series.value(i).to_string(), ids.value(i), values.value(i)));
        }
    }
    (nodes, samples)
}

/// Profiles of two tenants sharing a service name: each tenant's
/// functions are its own, and one profile per pprof (function table).
fn tenants_profiles(round: u32) -> Vec<Profile> {
    let mut out = Vec::new();
    for (tenant, names) in [
        ("acme", ["main", "serve", "parse", "acme_secret"]),
        ("globex", ["main", "serve", "render", "globex_secret"]),
    ] {
        for pod in 0..3u32 {
            let functions: Arc<Functions> = Arc::new(names.into_iter().collect());
            // Ranked in one buffer per pprof, as `normalise` makes them,
            // so the memo of leaves by rank is what gets tested.
            let last = [0, (round + pod) % 4];
            let (buffer, stacks) = ranked_stacks(&[&[0, 1], &[0, 1, 2], &[0, 1, 2, 3], &last]);
            out.push(Profile {
                tenant: tenant.into(),
                labels: vec![
                    ("pod".into(), format!("p{pod}")),
                    ("service_name".into(), "api".into()),
                ],
                profile_type: "cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
                time_nanos: i64::from(round),
                duration_nanos: 0,
                period: 0,
                functions,
                stacks: buffer,
                samples: stacks
                    .into_iter()
                    .enumerate()
                    .map(|(i, stack)| crate::profile::Sample {
                        stack,
                        value: i as i64 + 1,
                        span_id: None,
                    })
                    .collect(),
            });
        }
    }
    out
}

/// Blocks written with node ids cached from earlier blocks hold what
/// blocks written from nothing hold, dataset by dataset, also when the
/// cache is dropped after every block; and a tenant's stacks section
/// never holds a node of another tenant that shares its service name.
#[test]
fn cached_node_ids_write_the_blocks_a_fresh_writer_writes_and_stay_per_tenant() {
    let mut warm = StackNodes::default();
    let mut tiny = StackNodes::with_limit(1);
    for round in 0..4 {
        let profiles = tenants_profiles(round);
        let fresh = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
        let warm_block = write_block(&profiles, 0, &mut warm).unwrap();
        let tiny_block = write_block(&profiles, 0, &mut tiny).unwrap();
        assert_eq!(tiny.bytes(), 0, "a cache past its limit is dropped");
        assert_eq!(fresh.meta.datasets.len(), 2);
        for d in 0..2 {
            let want = dataset_rows(&fresh, d);
            assert_eq!(
                dataset_rows(&warm_block, d),
                want,
                "round {round} dataset {d}"
            );
            assert_eq!(
                dataset_rows(&tiny_block, d),
                want,
                "round {round} dataset {d}"
            );
            let tenant = &fresh.meta.datasets[d].tenant;
            let other = if tenant == "acme" {
                "globex_secret"
            } else {
                "acme_secret"
            };
            assert!(want.0.iter().all(|(_, _, name)| name != other), "{tenant}");
            assert!(want
                .0
                .iter()
                .any(|(_, _, name)| name.starts_with(tenant.as_str())));
        }
    }
    assert!(warm.bytes() > 0);
}
