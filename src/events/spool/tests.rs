use super::frame::{encode, frame_len};
use super::segment::segment_name;
use super::*;
use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "fhir-gateway-spool-{name}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        TempDir(p)
    }

    fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn cfg(dir: &TempDir, segment_bytes: u64, max_bytes: u64) -> SpoolConfig {
    SpoolConfig {
        dir: dir.path(),
        fsync: Fsync::Never,
        max_bytes,
        segment_bytes,
    }
}

/// Key "k" + a 10-byte payload: a 31-byte frame.
fn rec(i: u64) -> Record {
    Record {
        key: "k".into(),
        payload: format!("{i:010}").into_bytes(),
    }
}
const REC: u64 = 31;

fn payloads(v: &[(u64, Record)]) -> Vec<u64> {
    v.iter()
        .map(|(_, r)| {
            String::from_utf8(r.payload.clone())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn seqs(v: &[(u64, Record)]) -> Vec<u64> {
    v.iter().map(|(s, _)| *s).collect()
}

fn segment_files(dir: &TempDir) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

fn seg_path(dir: &TempDir, first: u64) -> PathBuf {
    dir.path().join(segment_name(first))
}

#[test]
fn crc32_known_values() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"a"), 0xE8B7_BE43);
    assert_eq!(frame_len(&rec(1)), REC);
    assert_eq!(encode(1, &rec(1)).len() as u64, REC);
}

#[test]
fn append_and_read_in_order() {
    let d = TempDir::new("order");
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    assert_eq!((s.first_pending(), s.next_seq(), s.depth()), (1, 1, 0));
    for i in 1..=10 {
        assert_eq!(s.append(&rec(i * 100)).unwrap(), i);
    }
    assert_eq!(s.depth(), 10);
    assert_eq!(s.bytes(), 10 * REC);
    let all = s.read_from(1, 100).unwrap();
    assert_eq!(seqs(&all), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        payloads(&all),
        (1..=10).map(|i| i * 100).collect::<Vec<_>>()
    );
    assert_eq!(all[0].1.key, "k");
    assert_eq!(seqs(&s.read_from(4, 3).unwrap()), [4, 5, 6]);
    assert_eq!(seqs(&s.read_from(9, 100).unwrap()), [9, 10]);
    assert!(s.read_from(11, 10).unwrap().is_empty());
    assert!(s.read_from(1, 0).unwrap().is_empty());
    // Empty key and payload, binary payload.
    let odd = Record {
        key: String::new(),
        payload: vec![0, 255, 10, 13],
    };
    let n = s.append(&odd).unwrap();
    assert_eq!(s.read_from(n, 1).unwrap()[0].1, odd);
    // Below the cursor: starts at the first pending.
    s.ack(3).unwrap();
    assert_eq!(seqs(&s.read_from(1, 2).unwrap()), [4, 5]);
}

#[test]
fn segment_rollover() {
    let d = TempDir::new("roll");
    // Two records per segment.
    let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
    for i in 1..=5 {
        s.append(&rec(i)).unwrap();
    }
    assert_eq!(
        segment_files(&d),
        [segment_name(1), segment_name(3), segment_name(5)]
    );
    assert_eq!(fs::metadata(seg_path(&d, 1)).unwrap().len(), 2 * REC);
    // A record larger than a segment gets one of its own.
    let big = Record {
        key: "big".into(),
        payload: vec![7; 500],
    };
    assert_eq!(s.append(&big).unwrap(), 6);
    assert_eq!(s.append(&rec(7)).unwrap(), 7);
    assert_eq!(
        segment_files(&d),
        [1, 3, 5, 6, 7].map(segment_name).to_vec(),
    );
    let all = s.read_from(1, 100).unwrap();
    assert_eq!(seqs(&all), (1..=7).collect::<Vec<_>>());
    assert_eq!(all[5].1, big);
    assert_eq!(
        seqs(&s.read_from(2, 3).unwrap()),
        [2, 3, 4],
        "across segments"
    );
}

#[test]
fn ack_trims_delivered_segments() {
    let d = TempDir::new("ack");
    let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
    for i in 1..=5 {
        s.append(&rec(i)).unwrap();
    }
    s.ack(1).unwrap();
    assert_eq!(segment_files(&d).len(), 3, "segment 1 still holds 2");
    assert_eq!(s.bytes(), 5 * REC);
    s.ack(3).unwrap();
    assert_eq!(segment_files(&d), [segment_name(3), segment_name(5)]);
    assert_eq!(s.bytes(), 3 * REC);
    assert_eq!((s.first_pending(), s.depth()), (4, 2));
    s.ack(2).unwrap(); // already acknowledged: no-op
    assert_eq!(s.first_pending(), 4);
    let e = s.ack(6).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    // Everything: the current segment goes too.
    s.ack(5).unwrap();
    assert!(segment_files(&d).is_empty());
    assert_eq!((s.bytes(), s.depth(), s.first_pending()), (0, 0, 6));
    assert_eq!(s.append(&rec(6)).unwrap(), 6);
    assert_eq!(segment_files(&d), [segment_name(6)]);
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [6]);
    drop(s);
    let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
    assert_eq!((s.first_pending(), s.next_seq()), (6, 7));
}

#[test]
fn reopen_replays_only_unacked() {
    let d = TempDir::new("reopen");
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    for i in 1..=10 {
        s.append(&rec(i)).unwrap();
    }
    s.ack(4).unwrap();
    drop(s);
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    assert_eq!(s.recovery().replayed, 6);
    assert_eq!(s.recovery().torn_bytes, 0);
    assert!(s.recovery().corrupt.is_none());
    assert_eq!((s.first_pending(), s.depth()), (5, 6));
    assert_eq!(payloads(&s.read_from(0, 100).unwrap()), [5, 6, 7, 8, 9, 10]);
    // Segment 1 (1..3) was deleted; 4..6 kept for 5 and 6.
    assert_eq!(segment_files(&d), [4, 7, 10].map(segment_name).to_vec());
    assert_eq!(s.append(&rec(11)).unwrap(), 11);
    s.ack(10).unwrap();
    drop(s);
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    assert_eq!(payloads(&s.read_from(0, 100).unwrap()), [11]);
    s.ack(11).unwrap();
    drop(s);
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    assert_eq!((s.depth(), s.next_seq(), s.bytes()), (0, 12, 0));
    assert_eq!(s.recovery().replayed, 0);
}

#[test]
fn torn_last_record_is_cut_off() {
    for (case, tail) in [
        ("partial header", encode(4, &rec(4))[..5].to_vec()),
        ("partial body", encode(4, &rec(4))[..20].to_vec()),
        ("bad checksum at the end", {
            let mut f = encode(4, &rec(4));
            let n = f.len();
            f[n - 1] ^= 0x55;
            f
        }),
        ("zeros", vec![0u8; 4096]),
    ] {
        let d = TempDir::new("torn");
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        for i in 1..=3 {
            s.append(&rec(i)).unwrap();
        }
        drop(s);
        let p = seg_path(&d, 1);
        OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(&tail)
            .unwrap();
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert_eq!(s.recovery().torn_bytes, tail.len() as u64, "{case}");
        assert!(s.recovery().corrupt.is_none(), "{case}");
        assert_eq!(s.depth(), 3, "{case}");
        assert_eq!(fs::metadata(&p).unwrap().len(), 3 * REC, "{case}");
        assert_eq!(s.append(&rec(4)).unwrap(), 4, "{case}");
        drop(s);
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert_eq!(s.recovery().torn_bytes, 0, "{case}");
        assert_eq!(
            payloads(&s.read_from(1, 10).unwrap()),
            [1, 2, 3, 4],
            "{case}"
        );
    }
}

#[test]
fn corruption_in_the_middle_stops_the_replay() {
    let d = TempDir::new("corrupt");
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    for i in 1..=9 {
        s.append(&rec(i)).unwrap();
    }
    drop(s);
    // Record 5 is the second of segment 4: flip a payload byte.
    let p4 = seg_path(&d, 4);
    let mut b = fs::read(&p4).unwrap();
    b[REC as usize + 25] ^= 0x01;
    fs::write(&p4, &b).unwrap();

    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    let r = s.recovery().clone();
    let why = r.corrupt.expect("corruption reported");
    assert!(
        why.contains("sequence 5") && why.contains("checksum"),
        "{why}"
    );
    assert_eq!(r.quarantined.len(), 2);
    assert!(r.quarantined[0].ends_with(format!("{}.corrupt", segment_name(4))));
    assert!(r.quarantined[1].ends_with(format!("{}.corrupt", segment_name(7))));
    assert_eq!(
        fs::read(&r.quarantined[0]).unwrap(),
        b,
        "the damaged file is kept whole"
    );
    assert_eq!(s.depth(), 4);
    assert_eq!(payloads(&s.read_from(1, 100).unwrap()), [1, 2, 3, 4]);
    assert_eq!(segment_files(&d), [segment_name(1), segment_name(4)]);
    assert_eq!(s.bytes(), 4 * REC);
    assert_eq!(
        s.append(&rec(50)).unwrap(),
        5,
        "sequence numbers stay contiguous"
    );
    drop(s);
    let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
    assert!(s.recovery().corrupt.is_none());
    assert_eq!(payloads(&s.read_from(1, 100).unwrap()), [1, 2, 3, 4, 50]);
}

#[test]
fn corruption_inside_the_last_segment_is_not_a_torn_tail() {
    let d = TempDir::new("corrupt-last");
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    for i in 1..=5 {
        s.append(&rec(i)).unwrap();
    }
    drop(s);
    let p = seg_path(&d, 1);
    let mut b = fs::read(&p).unwrap();
    b[REC as usize] = 0xff; // record 2's length: impossible, and data follows
    b[REC as usize + 3] = 0xff;
    fs::write(&p, &b).unwrap();
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    assert!(s.recovery().corrupt.as_deref().unwrap().contains("length"));
    assert_eq!(s.recovery().torn_bytes, 0);
    assert_eq!(s.depth(), 1);
    assert_eq!(fs::metadata(&p).unwrap().len(), REC);
    assert_eq!(fs::read(&s.recovery().quarantined[0]).unwrap(), b);
}

#[test]
fn a_gap_between_segments_stops_the_replay() {
    let d = TempDir::new("gap");
    let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
    for i in 1..=6 {
        s.append(&rec(i)).unwrap();
    }
    drop(s);
    fs::remove_file(seg_path(&d, 3)).unwrap();
    let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
    assert!(s
        .recovery()
        .corrupt
        .as_deref()
        .unwrap()
        .contains("segment starts at 5"));
    assert_eq!(payloads(&s.read_from(1, 10).unwrap()), [1, 2]);
    assert_eq!(s.append(&rec(3)).unwrap(), 3);
}

#[test]
fn a_batch_is_one_write_per_segment_and_each_record_is_judged_alone() {
    let d = TempDir::new("batch");
    // Three records per segment, room for seven in all.
    let s = Spool::open(cfg(&d, 3 * REC, 7 * REC)).unwrap();
    let huge = Record {
        key: "k".into(),
        payload: vec![1; 1000],
    };
    let mut batch: Vec<Record> = (1..=4).map(rec).collect();
    batch.insert(2, huge.clone());
    let got = s.append_all(&batch);
    let summary: Vec<String> = got
        .iter()
        .map(|r| match r {
            Ok(seq) => seq.to_string(),
            Err(SpoolError::TooLarge { .. }) => "too large".into(),
            Err(e) => e.to_string(),
        })
        .collect();
    assert_eq!(summary, ["1", "2", "too large", "3", "4"]);
    assert_eq!(segment_files(&d), [segment_name(1), segment_name(4)]);
    assert_eq!(fs::metadata(seg_path(&d, 1)).unwrap().len(), 3 * REC);
    // The spool fills within a batch: what fits is taken, in order, the rest refused.
    let got = s.append_all(&(5..=9).map(rec).collect::<Vec<_>>());
    assert!(matches!(got[..3], [Ok(5), Ok(6), Ok(7)]), "{got:?}");
    assert!(got[3..]
        .iter()
        .all(|r| matches!(r, Err(SpoolError::Full { .. }))));
    assert_eq!((s.depth(), s.bytes(), s.next_seq()), (7, 7 * REC, 8));
    let all = s.read_from(0, 100).unwrap();
    assert_eq!(seqs(&all), (1..=7).collect::<Vec<_>>());
    assert_eq!(payloads(&all), [1, 2, 3, 4, 5, 6, 7]);
    drop(s);
    // What a batch wrote is replayed like single appends.
    let s = Spool::open(cfg(&d, 3 * REC, 7 * REC)).unwrap();
    assert_eq!(
        payloads(&s.read_from(0, 100).unwrap()),
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(s.append_all(&[]).len(), 0);
}

#[test]
fn full_at_max_bytes() {
    let d = TempDir::new("full");
    let s = Spool::open(cfg(&d, 2 * REC, 5 * REC)).unwrap();
    for i in 1..=5 {
        s.append(&rec(i)).unwrap();
    }
    match s.append(&rec(6)) {
        Err(SpoolError::Full { bytes, max_bytes }) => {
            assert_eq!((bytes, max_bytes), (5 * REC, 5 * REC))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((s.depth(), s.bytes(), s.next_seq()), (5, 5 * REC, 6));
    s.ack(1).unwrap();
    assert!(
        matches!(s.append(&rec(6)), Err(SpoolError::Full { .. })),
        "segment 1 still holds record 2"
    );
    s.ack(2).unwrap();
    assert_eq!(s.append(&rec(6)).unwrap(), 6);
    assert_eq!(s.append(&rec(7)).unwrap(), 7);
    assert!(matches!(s.append(&rec(8)), Err(SpoolError::Full { .. })));
    let huge = Record {
        key: "k".into(),
        payload: vec![1; 1000],
    };
    match s.append(&huge) {
        Err(SpoolError::TooLarge { len, max }) => assert_eq!((len, max), (1021, 5 * REC)),
        other => panic!("{other:?}"),
    }
    assert!(SpoolError::Full {
        bytes: 1,
        max_bytes: 1
    }
    .to_string()
    .contains("full"));
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [3, 4, 5, 6, 7]);
}

#[test]
fn concurrent_appends_keep_every_record_once() {
    let d = TempDir::new("threads");
    let s = Arc::new(Spool::open(cfg(&d, 4096, 1 << 30)).unwrap());
    let threads = 8u64;
    let each = 300u64;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..each {
                    let r = Record {
                        key: format!("t{t}"),
                        payload: format!("{t}:{i}").into_bytes(),
                    };
                    mine.push(s.append(&r).unwrap());
                }
                mine
            })
        })
        .collect();
    let mut all_seqs: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all_seqs.sort();
    assert_eq!(all_seqs, (1..=threads * each).collect::<Vec<_>>());
    let check = |s: &Spool| {
        let got = s.read_from(1, usize::MAX).unwrap();
        assert_eq!(seqs(&got), (1..=threads * each).collect::<Vec<_>>());
        let mut seen = HashSet::new();
        let mut last = vec![None::<u64>; threads as usize];
        for (_, r) in &got {
            let p = String::from_utf8(r.payload.clone()).unwrap();
            assert!(seen.insert(p.clone()), "duplicate {p}");
            let (t, i) = p.split_once(':').unwrap();
            let (t, i): (usize, u64) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(r.key, format!("t{t}"));
            assert!(last[t].is_none_or(|l| l < i), "thread order kept");
            last[t] = Some(i);
        }
        assert_eq!(seen.len() as u64, threads * each);
    };
    check(&s);
    assert!(segment_files(&d).len() > 1);
    drop(s);
    let s = Spool::open(cfg(&d, 4096, 1 << 30)).unwrap();
    assert!(s.recovery().corrupt.is_none());
    check(&s);
}

#[test]
fn fsync_modes() {
    for mode in [Fsync::Always, Fsync::EveryMs(5), Fsync::Never] {
        let d = TempDir::new("fsync");
        let c = SpoolConfig {
            fsync: mode,
            ..cfg(&d, 2 * REC, 1 << 30)
        };
        let s = Spool::open(c.clone()).unwrap();
        for i in 1..=5 {
            s.append(&rec(i)).unwrap();
        }
        match mode {
            Fsync::Always => assert!(!s.shared.lock().dirty),
            Fsync::EveryMs(_) => {
                let t = std::time::Instant::now();
                while s.shared.lock().dirty {
                    assert!(t.elapsed() < Duration::from_secs(5), "flusher never ran");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Fsync::Never => assert!(s.shared.lock().dirty),
        }
        s.ack(2).unwrap();
        s.sync().unwrap();
        drop(s); // joins the flusher
        let s = Spool::open(c).unwrap();
        assert_eq!(
            payloads(&s.read_from(0, 10).unwrap()),
            [3, 4, 5],
            "{mode:?}"
        );
    }
}

#[test]
fn every_ms_leaves_the_cursor_to_the_flusher_and_drop() {
    let d = TempDir::new("cursor-due");
    let c = SpoolConfig {
        fsync: Fsync::EveryMs(20),
        ..cfg(&d, 1 << 20, 1 << 30)
    };
    let s = Spool::open(c.clone()).unwrap();
    for i in 1..=4 {
        s.append(&rec(i)).unwrap();
    }
    s.ack(2).unwrap();
    let t = std::time::Instant::now();
    while cursor::read_cursor(&d.path()).unwrap() != Some(3) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the flusher never wrote the cursor"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Acknowledged, then dropped before the flusher's next round: `Drop` writes it.
    s.ack(3).unwrap();
    drop(s);
    assert_eq!(cursor::read_cursor(&d.path()).unwrap(), Some(4));
    let s = Spool::open(c).unwrap();
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [4]);
}

#[test]
fn unreadable_cursor_replays_everything() {
    let d = TempDir::new("cursor");
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    for i in 1..=4 {
        s.append(&rec(i)).unwrap();
    }
    s.ack(2).unwrap();
    drop(s);
    fs::write(d.path().join(CURSOR), b"garbage").unwrap();
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    assert!(s.recovery().cursor_reset);
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [1, 2, 3, 4]);
}

#[test]
fn bad_config_and_foreign_files() {
    let d = TempDir::new("cfg");
    assert!(Spool::open(cfg(&d, 0, 10)).is_err());
    assert!(Spool::open(cfg(&d, 10, 0)).is_err());
    assert!(Spool::open(SpoolConfig {
        fsync: Fsync::EveryMs(0),
        ..cfg(&d, 10, 10)
    })
    .is_err());
    // Created on open; other files and empty segments are harmless.
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    drop(s);
    fs::write(d.path().join("notes.txt"), b"x").unwrap();
    fs::write(seg_path(&d, 1), b"").unwrap();
    let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
    assert_eq!(s.depth(), 0);
    assert_eq!(s.append(&rec(1)).unwrap(), 1);
    assert!(d.path().join("notes.txt").exists());
}

#[test]
fn spool_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Spool>();
}
