//! Profiles on the wire between a distributor and a segment writer in
//! another process (`proto/ember/segmentwriter/v1/segmentwriter.proto`).
//! Profiles that share their function names and stacks (those decoded from
//! one pprof) travel as one group, and come back sharing them again.

use std::sync::Arc;

use ember_engine::profile::{Functions, Profile, Sample, Stack, Stacks};

use crate::messages::{LabelPair, ProfileGroup, WireProfile};

/// The groups of `profiles`, each buffer sent once.
pub(crate) fn groups_of(profiles: &[Profile]) -> Vec<ProfileGroup> {
    let mut groups: Vec<(*const Functions, *const Stacks, ProfileGroup)> = Vec::new();
    for p in profiles {
        let key = (Arc::as_ptr(&p.functions), Arc::as_ptr(&p.stacks));
        let at = match groups.iter().position(|(f, s, _)| (*f, *s) == key) {
            Some(at) => at,
            None => {
                groups.push((
                    key.0,
                    key.1,
                    ProfileGroup {
                        functions: p.functions.iter().map(str::to_string).collect(),
                        frames: p.stacks.frames().to_vec(),
                        profiles: Vec::new(),
                    },
                ));
                groups.len() - 1
            }
        };
        groups[at].2.profiles.push(wire_profile(p));
    }
    groups.into_iter().map(|(_, _, g)| g).collect()
}

fn wire_profile(p: &Profile) -> WireProfile {
    let n = p.samples.len();
    let has_span = p.samples.iter().any(|s| s.span_id.is_some());
    let mut w = WireProfile {
        tenant: p.tenant.clone(),
        labels: p
            .labels
            .iter()
            .map(|(name, value)| LabelPair {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        profile_type: p.profile_type.clone(),
        time_nanos: p.time_nanos,
        duration_nanos: p.duration_nanos,
        period: p.period,
        stack_starts: Vec::with_capacity(n),
        stack_ends: Vec::with_capacity(n),
        stack_ranks: Vec::with_capacity(n),
        values: Vec::with_capacity(n),
        span_ids: Vec::new(),
        has_span,
    };
    for s in &p.samples {
        let range = s.stack.range();
        w.stack_starts.push(range.start as u32);
        w.stack_ends.push(range.end as u32);
        w.stack_ranks.push(s.stack.rank().unwrap_or(u32::MAX));
        w.values.push(s.value);
        if has_span {
            w.span_ids.push(s.span_id.unwrap_or(0));
        }
    }
    w
}

/// The profiles of `groups`, those of a group sharing its buffers; an
/// error names what does not hold together.
pub(crate) fn profiles_of(groups: Vec<ProfileGroup>) -> Result<Vec<Profile>, String> {
    let mut out = Vec::new();
    for g in groups {
        let functions = Arc::new(g.functions.iter().collect::<Functions>());
        let frames_len = g.frames.len();
        let stacks = Arc::new(Stacks::from_frames(g.frames));
        for w in g.profiles {
            let n = w.values.len();
            if w.stack_starts.len() != n
                || w.stack_ends.len() != n
                || w.stack_ranks.len() != n
                || (w.has_span && w.span_ids.len() != n)
            {
                return Err(format!(
                    "a profile of tenant {:?} has {n} values but not as many stacks or spans",
                    w.tenant
                ));
            }
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let (start, end) = (w.stack_starts[i] as usize, w.stack_ends[i] as usize);
                if start > end || end > frames_len {
                    return Err(format!(
                        "a stack at {start}..{end} of a group of {frames_len} frames"
                    ));
                }
                samples.push(Sample {
                    stack: Stack::ranked(start..end, w.stack_ranks[i]),
                    value: w.values[i],
                    span_id: w.has_span.then(|| w.span_ids[i]).filter(|id| *id != 0),
                });
            }
            out.push(Profile {
                tenant: w.tenant,
                labels: w.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                profile_type: w.profile_type,
                time_nanos: w.time_nanos,
                duration_nanos: w.duration_nanos,
                period: w.period,
                functions: functions.clone(),
                stacks: stacks.clone(),
                samples,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_cross_the_wire_whole_and_still_sharing_their_buffers() {
        let functions = Arc::new(["main", "run", "work"].iter().collect::<Functions>());
        let (stacks, samples) =
            Stacks::with_samples([(vec![0u32, 1], 10, None), (vec![0, 1, 2], 5, Some(42))]);
        let profile = |tenant: &str, ty: &str| Profile {
            tenant: tenant.into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: ty.into(),
            time_nanos: 1_700_000_000_000_000_000,
            duration_nanos: 10_000_000_000,
            period: 100,
            functions: functions.clone(),
            stacks: stacks.clone(),
            samples: samples.clone(),
        };
        let sent = vec![
            profile("a", "cpu"),
            profile("a", "alloc"),
            profile("b", "cpu"),
        ];
        let groups = groups_of(&sent);
        assert_eq!(groups.len(), 1, "one pprof's profiles share one group");
        let back = profiles_of(groups).unwrap();
        assert_eq!(back, sent);
        assert!(Arc::ptr_eq(&back[0].stacks, &back[2].stacks));
        assert_eq!(back[0].samples[1].span_id, Some(42));

        let mut bad = groups_of(&sent);
        bad[0].profiles[0].stack_ends[0] = 99;
        assert!(profiles_of(bad).is_err());
        let mut bad = groups_of(&sent);
        bad[0].profiles[0].values.pop();
        assert!(profiles_of(bad).is_err());
    }
}
