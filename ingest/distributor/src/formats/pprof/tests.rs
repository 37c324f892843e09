use super::*;

fn key(field: u64, wire: u8, out: &mut Vec<u8>) {
    varint((field << 3) | u64::from(wire), out);
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn small_profile() -> Profile {
    Profile {
        string_table: ["", "cpu", "ns", "main", "work", "k", "v"]
            .map(String::from)
            .to_vec(),
        sample_type: vec![ValueType { r#type: 1, unit: 2 }],
        period_type: Some(ValueType { r#type: 1, unit: 2 }),
        period: 10,
        time_nanos: 7,
        duration_nanos: 9,
        function: vec![
            Function {
                id: 1,
                name: 3,
                ..Default::default()
            },
            Function {
                id: 2,
                name: 4,
                ..Default::default()
            },
        ],
        location: vec![Location {
            id: 5,
            address: 0x40,
            line: vec![
                Line {
                    function_id: 2,
                    line: 12,
                    ..Default::default()
                },
                Line {
                    function_id: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        sample: vec![Sample {
            location_id: vec![5, 5],
            value: vec![-3, 1 << 40],
            label: vec![Label {
                key: 5,
                str: 6,
                ..Default::default()
            }],
        }],
        mapping: vec![Mapping {
            id: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every prefix of an encoded profile is read as prost reads it: an
/// error where prost fails, the same fields where it succeeds.
#[test]
fn every_prefix_reads_as_prost_reads_it() {
    let bytes = small_profile().encode_to_vec();
    for cut in 0..=bytes.len() {
        let prefix = &bytes[..cut];
        match (FlatProfile::decode(prefix), Profile::decode(prefix)) {
            (Ok(flat), Ok(p)) => assert_eq!(flat, FlatProfile::of(&p), "cut {cut}"),
            (Err(_), Err(_)) => {}
            (flat, p) => panic!("cut {cut}: {flat:?} but prost {p:?}"),
        }
    }
    let whole = FlatProfile::decode(&bytes).unwrap();
    let s = &whole.samples[0];
    assert_eq!(whole.location_ids(s).to_vec(), [5, 5]);
    assert_eq!(whole.values(s), &[-3, 1 << 40]);
    assert_eq!(whole.labels(s), &[FlatLabel { key: 5, str: 6 }]);
    assert_eq!(whole.line_functions(&whole.locations[0]), &[2, 1]);
    assert_eq!(whole.string(4, "f").unwrap(), b"work");
    assert!(whole
        .string(7, "function.name")
        .unwrap_err()
        .to_string()
        .contains("function.name"));
}

/// Repeated numbers one per key (as proto2 writers send them) read as
/// the packed form does; unknown fields are skipped; a message field
/// seen twice merges.
#[test]
fn unpacked_numbers_unknown_fields_and_split_messages_read_as_protobuf_says() {
    let mut sample = Vec::new();
    for id in [5u64, 6] {
        key(1, WIRE_VARINT, &mut sample);
        varint(id, &mut sample);
    }
    key(2, WIRE_VARINT, &mut sample);
    varint(-1i64 as u64, &mut sample);
    key(9, WIRE_FIXED64, &mut sample);
    sample.extend_from_slice(&[0; 8]);
    key(10, WIRE_FIXED32, &mut sample);
    sample.extend_from_slice(&[0; 4]);
    let mut profile = Vec::new();
    key(2, WIRE_LEN, &mut profile);
    varint(sample.len() as u64, &mut profile);
    profile.extend_from_slice(&sample);
    for (field, value) in [(1u64, 3u64), (2, 4)] {
        let mut period_type = Vec::new();
        key(field, WIRE_VARINT, &mut period_type);
        varint(value, &mut period_type);
        key(11, WIRE_LEN, &mut profile);
        varint(period_type.len() as u64, &mut profile);
        profile.extend_from_slice(&period_type);
    }
    let flat = FlatProfile::decode(&profile).unwrap();
    assert_eq!(
        flat,
        FlatProfile::of(&Profile::decode(profile.as_slice()).unwrap())
    );
    assert_eq!(flat.location_ids(&flat.samples[0]).to_vec(), [5, 6]);
    assert_eq!(flat.values(&flat.samples[0]), &[-1]);
    assert_eq!(flat.period_type, Some(ValueType { r#type: 3, unit: 4 }));
}

/// Packed location ids and values of every varint length, and the
/// ways a packed run can be malformed, read as prost reads them.
#[test]
fn packed_varints_of_every_length_read_as_prost_reads_them() {
    let mut numbers: Vec<u64> = (0..64).map(|bits| 1u64 << bits).collect();
    numbers.extend((0..64).map(|bits| (1u64 << bits) - 1));
    numbers.extend([127, 128, 16_383, 16_384, u64::MAX]);
    let mut run = Vec::new();
    for n in &numbers {
        varint(*n, &mut run);
    }
    let runs = [
        run.clone(),
        // Cut inside a two-byte and inside a ten-byte varint.
        vec![0x05, 0x80],
        vec![0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        // Eleven bytes: longer than a varint can be.
        vec![0xff; 10].into_iter().chain([0x01]).collect(),
        // Ten bytes whose last holds more than the 64th bit.
        vec![0xff; 9].into_iter().chain([0x02]).collect(),
        // Two bytes not in the shortest form still read as their value.
        vec![0x80, 0x00, 0x81, 0x01],
    ];
    for (i, run) in runs.iter().enumerate() {
        let mut sample = Vec::new();
        for field in [1u64, 2] {
            key(field, WIRE_LEN, &mut sample);
            varint(run.len() as u64, &mut sample);
            sample.extend_from_slice(run);
        }
        let mut profile = Vec::new();
        key(2, WIRE_LEN, &mut profile);
        varint(sample.len() as u64, &mut profile);
        profile.extend_from_slice(&sample);
        match (
            FlatProfile::decode(&profile),
            Profile::decode(profile.as_slice()),
        ) {
            (Ok(flat), Ok(p)) => assert_eq!(flat, FlatProfile::of(&p), "run {i}"),
            (Err(_), Err(_)) => {}
            (flat, p) => panic!("run {i}: {flat:?} but prost {p:?}"),
        };
    }
    let mut sample = Vec::new();
    key(1, WIRE_LEN, &mut sample);
    varint(run.len() as u64, &mut sample);
    sample.extend_from_slice(&run);
    let mut profile = Vec::new();
    key(2, WIRE_LEN, &mut profile);
    varint(sample.len() as u64, &mut profile);
    profile.extend_from_slice(&sample);
    let flat = FlatProfile::decode(&profile).unwrap();
    assert_eq!(flat.location_ids(&flat.samples[0]).to_vec(), numbers);
}

/// The word-at-a-time check says what a byte-at-a-time reading says:
/// whole varints of at most 9 bytes.
#[test]
fn short_varints_are_found_as_a_byte_at_a_time_finds_them() {
    let reference = |data: &[u8]| {
        let (mut run, mut longest) = (0, 0);
        for &b in data {
            run = if b >= 0x80 { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        run == 0 && longest < 9
    };
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut agree = [0usize; 2];
    for _ in 0..50_000 {
        let len = next() as usize % 40;
        // Mostly continuation bytes, so long runs come up often.
        let data: Vec<u8> = (0..len)
            .map(|_| if next() % 8 == 0 { 0x05 } else { 0x85 })
            .collect();
        let want = reference(&data);
        assert_eq!(short_varints(&data), want, "{data:x?}");
        agree[usize::from(want)] += 1;
    }
    assert!(agree[0] > 1000 && agree[1] > 1000, "{agree:?}");
}

/// A known field with another wire type than its own is an error, as
/// prost makes it, in every message Ember reads, also the ones it
/// skips; and a message nested thousands deep costs no recursion.
#[test]
fn known_fields_with_the_wrong_wire_type_are_errors_as_in_prost() {
    let len_field = |field: u64, inner: &[u8]| {
        let mut out = Vec::new();
        key(field, WIRE_LEN, &mut out);
        varint(inner.len() as u64, &mut out);
        out.extend_from_slice(inner);
        out
    };
    // (field of Profile holding the message, field inside it)
    let nested_cases: [(u64, Option<u64>, u64); 9] = [
        (2, Some(3), 3), // Sample.label.num
        (2, Some(3), 4), // Sample.label.num_unit
        (3, None, 5),    // Mapping.filename
        (4, None, 2),    // Location.mapping_id
        (4, None, 5),    // Location.is_folded
        (4, Some(4), 2), // Location.line.line
        (5, None, 4),    // Function.filename
        (5, None, 5),    // Function.start_line
        (2, Some(3), 1), // Sample.label.key
    ];
    for (outer, middle, field) in nested_cases {
        let wrong = len_field(field, &[0]);
        let inner = match middle {
            Some(m) => len_field(m, &wrong),
            None => wrong,
        };
        let profile = len_field(outer, &inner);
        assert!(
            Profile::decode(profile.as_slice()).is_err(),
            "{outer}/{middle:?}/{field}"
        );
        let err = FlatProfile::decode(&profile).unwrap_err();
        assert!(err.to_string().contains("where a varint belongs"), "{err}");
    }
    for field in [7u64, 8, 14, 15] {
        let profile = len_field(field, &[0]);
        assert!(Profile::decode(profile.as_slice()).is_err());
        assert!(FlatProfile::decode(&profile).is_err(), "{field}");
    }
    // comment (13) packed, with a varint cut short
    let profile = len_field(13, &[0x80]);
    assert!(Profile::decode(profile.as_slice()).is_err());
    assert!(FlatProfile::decode(&profile).is_err());
    // Labels nested 5,000 deep in the label's num field.
    let mut inner = Vec::new();
    for _ in 0..5000 {
        inner = len_field(3, &inner);
    }
    let profile = len_field(2, &inner);
    let err = FlatProfile::decode(&profile).unwrap_err();
    assert!(matches!(err, IngestError::Decode { .. }), "{err}");
}

#[test]
fn malformed_wire_data_is_a_decode_error_that_says_why() {
    let cases: [(&[u8], &str); 4] = [
        // time_nanos (a varint) sent as a length-delimited field
        (&[9 << 3 | 2, 1, 0], "wire type 2 where a varint belongs"),
        // a string of 5 bytes with 1 left
        (&[6 << 3 | 2, 5, b'a'], "runs past the end"),
        (
            &[
                9 << 3,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                1,
            ],
            "longer than 10 bytes",
        ),
        // a start-group key of an unknown field (16)
        (&[0x83, 0x01], "unsupported wire type 3"),
    ];
    for (bytes, want) in cases {
        let err = FlatProfile::decode(bytes).unwrap_err();
        assert!(matches!(err, IngestError::Decode { .. }), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[test]
fn a_thread_decodes_into_the_arrays_of_the_profile_it_dropped() {
    let mut larger = small_profile();
    larger.sample = std::iter::repeat_n(larger.sample[0].clone(), 40).collect();
    let larger = larger.encode_to_vec();
    let bytes = small_profile().encode_to_vec();
    let first = FlatProfile::decode(&larger).unwrap();
    assert_eq!(first.samples.len(), 40);
    let arrays = |p: &FlatProfile| {
        (
            p.strings.as_ptr() as usize,
            p.samples.as_ptr() as usize,
            p.sample_values.as_ptr() as usize,
            p.sample_labels.as_ptr() as usize,
        )
    };
    let before = arrays(&first);
    drop(first);
    let next = FlatProfile::decode(&bytes).unwrap();
    assert_eq!(arrays(&next), before);
    // Nothing of the larger profile is left in them.
    let prost = Profile::decode(bytes.as_slice()).unwrap();
    assert_eq!(next, FlatProfile::of(&prost));
    assert_eq!(next.samples.len(), 1);
}

#[test]
fn arrays_are_sized_within_what_the_input_holds() {
    // Many sample types times many samples would claim a vast array
    // of values; the room taken stays within the bytes sent.
    let mut data = Vec::new();
    for _ in 0..20_000 {
        key(1, WIRE_LEN, &mut data);
        varint(0, &mut data);
    }
    for _ in 0..20_000 {
        key(2, WIRE_LEN, &mut data);
        varint(0, &mut data);
    }
    let p = FlatProfile::decode(&data).unwrap();
    assert_eq!((p.sample_types.len(), p.samples.len()), (20_000, 20_000));
    assert!(
        p.sample_values.capacity() <= data.len(),
        "{}",
        p.sample_values.capacity()
    );
    assert!(p.sample_locations.capacity() <= data.len());
}

#[test]
fn a_stream_cannot_reach_into_the_last_one_inflated_on_its_thread() {
    // The per-thread inflater's window still holds the last profile it
    // inflated (another tenant's, perhaps). A stream whose matches
    // point before its own start must not be filled from it.
    let secret: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let first = gzip_with(flate2::GzBuilder::new(), &secret);
    assert_eq!(gunzip(&first, 1 << 20, "t").unwrap(), secret);
    // One fixed-Huffman block (RFC 1951, 3.2.6): copy 258 bytes from
    // 4,096 back, then end. Were the old window readable, this would
    // inflate to the secret's first 258 bytes and match the trailer.
    let mut bits = Bits::default();
    bits.push(1, 1); // last block
    bits.push(1, 2); // fixed codes
    bits.code(0b1100_0101, 8); // length 258 (code 285)
    bits.code(23, 5); // distance 3,073..=4,096
    bits.push(4096 - 3073, 10);
    bits.code(0, 7); // end of block
    let leaked = &secret[..258];
    let mut forged = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    forged.extend_from_slice(&bits.bytes);
    forged.extend_from_slice(&crc32fast::hash(leaked).to_le_bytes());
    forged.extend_from_slice(&(leaked.len() as u32).to_le_bytes());
    // zlib-rs inflates matches from before the stream's start as zeros:
    // never the previous stream's bytes.
    let mut out = Vec::with_capacity(1024);
    let inflated = INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        inflate(inflater, &forged[10..], &mut out, 1024)
    });
    assert!(inflated.is_err() || out != leaked);
    let err = gunzip(&forged, 1 << 20, "t").unwrap_err();
    assert!(matches!(err, IngestError::Decompress { .. }), "{err}");
}

/// Deflate's bit order: fields least significant bit first, Huffman
/// codes most significant bit first.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    used: u32,
}

impl Bits {
    fn push(&mut self, value: u32, n: u32) {
        for i in 0..n {
            if self.used.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let bit = ((value >> i) & 1) as u8;
            *self.bytes.last_mut().unwrap() |= bit << (self.used % 8);
            self.used += 1;
        }
    }

    fn code(&mut self, code: u32, n: u32) {
        for i in (0..n).rev() {
            self.push((code >> i) & 1, 1);
        }
    }
}

fn gzip_with(builder: flate2::GzBuilder, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = builder.write(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn reference_gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn gunzip_reads_what_a_gzip_reader_reads() {
    for (name, bytes) in ember_fixtures::pprof_fixtures() {
        if bytes.starts_with(&GZIP_MAGIC) {
            let out = gunzip(&bytes, 64 << 20, "t").unwrap();
            assert_eq!(out, reference_gunzip(&bytes), "{name}");
        }
    }
    // Optional header fields, and trailing bytes after the member.
    let data: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    let builder = flate2::GzBuilder::new()
        .filename("profile.pb")
        .comment("from a test")
        .extra(vec![1, 2, 3]);
    let mut gz = gzip_with(builder, &data);
    assert_eq!(gunzip(&gz, data.len(), "t").unwrap(), data);
    gz.extend_from_slice(b"trailing");
    assert_eq!(gunzip(&gz, data.len(), "t").unwrap(), data);
    assert_eq!(
        gunzip(&gzip_with(flate2::GzBuilder::new(), b""), 0, "t").unwrap(),
        b""
    );
}

#[test]
fn gunzip_refuses_bad_streams_and_keeps_working_after() {
    let data: Vec<u8> = (0..100_000u32)
        .flat_map(|i| (i % 13).to_le_bytes())
        .collect();
    let gz = gzip_with(flate2::GzBuilder::new(), &data);
    let refused = |bytes: &[u8], limit: usize, want: &str| {
        let err = gunzip(bytes, limit, "t").unwrap_err();
        assert!(matches!(err, IngestError::Decompress { .. }), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
    };
    refused(&gz, data.len() - 1, "exceeds the limit");
    refused(&gz[..gz.len() / 2], 1 << 20, "ends early");
    refused(&gz[..gz.len() - 4], 1 << 20, "trailer is missing");
    refused(&gz[..5], 1 << 20, "header is cut short");
    refused(b"\x1f\x8b not really gzip", 1 << 20, "not a gzip stream");
    let mut bad_crc = gz.clone();
    let at = bad_crc.len() - 8;
    bad_crc[at] ^= 1;
    refused(&bad_crc, 1 << 20, "checksum");
    let mut bad_len = gz.clone();
    let at = bad_len.len() - 4;
    bad_len[at] ^= 1;
    refused(&bad_len, 1 << 20, "length");
    let mut corrupt = gz.clone();
    corrupt[12] ^= 0xff;
    assert!(gunzip(&corrupt, 1 << 20, "t").is_err());
    // A trailer claiming 4 GiB reserves no more than the input allows,
    // and the thread's inflater still reads a good stream after all this.
    let mut forged = gz.clone();
    let at = forged.len() - 4;
    forged[at..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(initial_capacity(&forged, usize::MAX) <= forged.len() * 32);
    refused(&forged, 1 << 20, "length");
    assert_eq!(gunzip(&gz, data.len(), "t").unwrap(), data);
}

/// The whole-member path serves a member within the limit whose
/// trailer tells its size; every other member takes the streaming path
/// and reads (or is refused) as before.
#[test]
fn members_inflate_whole_only_when_the_trailer_and_limit_allow() {
    let (_, fixture) = ember_fixtures::pprof_fixtures()
        .into_iter()
        .find(|(name, _)| name == "go-heap.pb.gz")
        .unwrap();
    let plain = reference_gunzip(&fixture);
    let whole = inflate_whole(&fixture, plain.len()).expect("whole member");
    assert_eq!(whole, plain);
    assert_eq!(gunzip(&fixture, plain.len(), "t").unwrap(), plain);
    // One byte over the limit: not whole, and refused by the stream.
    assert!(inflate_whole(&fixture, plain.len() - 1).is_none());
    assert!(gunzip(&fixture, plain.len() - 1, "t").is_err());
    // A trailer that claims less than the member holds.
    let mut short = fixture.clone();
    let at = short.len() - 4;
    short[at..].copy_from_slice(&(plain.len() as u32 - 1).to_le_bytes());
    assert!(inflate_whole(&short, 1 << 30).is_none());
    let err = gunzip(&short, 1 << 30, "t").unwrap_err();
    assert!(err.to_string().contains("length"), "{err}");
    // Inflating past 32x its size: streamed, not refused.
    let zeros = vec![0u8; 4 << 20];
    let gz = gzip_with(flate2::GzBuilder::new(), &zeros);
    assert!(gz.len() * 32 < zeros.len());
    assert!(inflate_whole(&gz, 8 << 20).is_none());
    assert_eq!(gunzip(&gz, 8 << 20, "t").unwrap(), zeros);
}
